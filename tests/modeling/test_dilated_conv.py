"""Dilated convolutions without the taps that only read padding: same values and gradients as F.conv2d."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from selftrain_d2.modeling.dilated_conv import PaddingFreeConv2d, convert_dilated_convs, live_taps, padding_free_conv2d


@pytest.mark.parametrize("size,kernel,dilation,expected", [
    (2, 3, 2, 0),  # tap at +-2 is outside a 2-long map
    (3, 3, 2, 1),
    (4, 3, 4, 0),
    (5, 3, 4, 1),
    (8, 3, 6, 1),
    (6, 5, 3, 1),  # taps at +-3 live, +-6 not
    (7, 5, 3, 2),
    (1, 3, 1, 0),
])
def test_live_taps_by_hand(size, kernel, dilation, expected):
    assert live_taps(size, kernel, dilation) == expected


@pytest.mark.parametrize("hw,kernel,dilation,groups", [
    *itertools.product([(2, 4), (4, 8), (3, 6), (2, 5), (7, 7), (1, 9)], [(3, 3)], [(2, 2), (4, 4), (6, 6)], [1, 4]),
    ((5, 9), (5, 3), (2, 3), 1),
    ((6, 4), (5, 5), (3, 1), 4),
])
def test_padding_free_conv2d_equals_conv2d_values_and_gradients(hw, kernel, dilation, groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, *hw, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6 if groups == 1 else 8, 8 // groups, *kernel, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(w.shape[0], dtype=torch.float64, generator=g, requires_grad=True)
    padding = tuple(d * (k // 2) for d, k in zip(dilation, kernel))
    ref = F.conv2d(x, w, b, 1, padding, dilation, groups)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad(ref, (x, w, b), grad_out)
    out = padding_free_conv2d(x, w, b, dilation, groups)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), grad_out), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padding_free_conv_rejects_other_paddings_and_strides():
    with pytest.raises(ValueError, match="padding = dilation"):
        PaddingFreeConv2d(4, 4, 3, padding=1, dilation=2)
    with pytest.raises(ValueError, match="stride 1"):
        PaddingFreeConv2d(4, 4, 3, stride=2, padding=2, dilation=2)


def test_global_pool_head_matches_detectron2_head_with_the_same_state_dict(fast_cfg):
    """The head converts its dilated ASPP convs; with Detectron2's head's weights it gives the same losses and
    gradients (at the full crop, where Detectron2's pooling kernel is global too)."""
    from selftrain_d2.modeling import build_model

    torch.manual_seed(0)
    d2 = build_model(fast_cfg("MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHead"))
    ours = build_model(fast_cfg("MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusGlobalPoolHead"))
    converted = [m for m in ours.sem_seg_head.modules() if isinstance(m, PaddingFreeConv2d)]
    assert len(converted) == 3  # the ASPP's three dilated convolutions
    assert list(ours.state_dict()) == list(d2.state_dict())
    ours.load_state_dict(d2.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = [{"image": torch.randint(0, 256, (3, 128, 256), dtype=torch.uint8, generator=g),
              "sem_seg": torch.randint(0, 10, (128, 256), generator=g)} for _ in range(2)]
    losses = []
    for model in (d2, ours):
        model.double().train()  # float64: the two heads' pooling layers round differently in float32
        torch.manual_seed(2)  # the same ASPP dropout mask
        loss = sum(model(batch).values())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
    for (name, p_d2), p_ours in zip(d2.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_d2.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_convert_keeps_parameters_and_skips_undilated_convs():
    from detectron2.layers import Conv2d

    net = torch.nn.Sequential(Conv2d(4, 4, 3, padding=2, dilation=2, norm=torch.nn.BatchNorm2d(4)),
                              Conv2d(4, 4, 3, padding=1), Conv2d(4, 4, 3, stride=2, padding=2, dilation=2))
    weight = net[0].weight
    convert_dilated_convs(net)
    assert type(net[0]) is PaddingFreeConv2d and net[0].weight is weight
    assert isinstance(net[0].norm, torch.nn.BatchNorm2d)
    assert type(net[1]) is Conv2d and type(net[2]) is Conv2d
