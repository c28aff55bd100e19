"""Speed-ups of the Mask2Former model that must not change its values: frozen batch norm folded into
convolutions, the channels-last backbone input, the one-matmul BCE matching cost."""
import copy

import torch
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from selftrain_d2.modeling.frozen_bn import FrozenBNConv2d, fold_frozen_batchnorm
from selftrain_d2.modeling.losses import batch_sigmoid_ce_cost
from selftrain_d2.modeling.meta_arch.mask_former import backbone_input


def _frozen_conv(bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = Conv2d(3, 4, 3, padding=1, bias=bias, norm=FrozenBatchNorm2d(4), activation=torch.relu)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.norm.weight.copy_(torch.rand(4, generator=g) + 0.5)
        conv.norm.bias.copy_(torch.randn(4, generator=g))
        conv.norm.running_mean.copy_(torch.randn(4, generator=g))
        conv.norm.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return conv


def test_folded_conv_equals_conv_then_frozen_bn_in_values_and_gradients():
    for bias in (False, True):
        conv = _frozen_conv(bias)
        reference = copy.deepcopy(conv)
        keys = {k: v.shape for k, v in conv.state_dict().items()}
        assert fold_frozen_batchnorm(torch.nn.Sequential(conv)) == 1
        assert type(conv) is FrozenBNConv2d and {k: v.shape for k, v in conv.state_dict().items()} == keys
        x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
        grads = []
        for module in (conv, reference):
            leaf = x.clone().requires_grad_(True)
            out = module(leaf)
            grads.append(torch.autograd.grad(out.pow(2).sum(), [leaf] + [p for p in module.parameters()]))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # The frozen statistics get no gradient and stay buffers / frozen parameters.
        assert not any(p.requires_grad for p in conv.norm.parameters())


def test_folding_follows_later_changes_of_the_norm_and_leaves_other_convs_alone():
    conv = _frozen_conv(False)
    plain = Conv2d(3, 4, 1, norm=torch.nn.GroupNorm(2, 4))
    assert fold_frozen_batchnorm(torch.nn.Sequential(conv, plain)) == 1
    assert type(plain) is Conv2d
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        conv.norm.running_mean.add_(1.0)  # e.g. a checkpoint loaded after folding
        expected = torch.relu(conv.norm(torch.nn.functional.conv2d(x, conv.weight, None, padding=1)))
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        conv.norm = torch.nn.Identity()
        torch.testing.assert_close(conv(x), torch.relu(torch.nn.functional.conv2d(x, conv.weight, None, padding=1)))


def test_folded_resnet_equals_the_unfolded_one():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(0)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
    reference = copy.deepcopy(backbone)
    assert fold_frozen_batchnorm(backbone) == sum(isinstance(m, FrozenBatchNorm2d) for m in reference.modules())
    assert backbone.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = backbone(backbone_input(backbone, x)), reference(x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4 * want[name].abs().max().item())


def test_backbone_input_is_channels_last_only_for_a_resnet_on_the_cpu():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    resnet = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    x = torch.randn(2, 3, 8, 8)
    cl = backbone_input(resnet, x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    assert backbone_input(torch.nn.Identity(), x) is x


def test_one_matmul_bce_cost_equals_the_two_matmul_form():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(7, 50, generator=g, dtype=torch.float64) * 5
    targets = (torch.rand(3, 50, generator=g, dtype=torch.float64) > 0.5).double()
    pos, neg = torch.nn.functional.softplus(-inputs), torch.nn.functional.softplus(inputs)
    two_matmuls = (pos @ targets.T + neg @ (1 - targets).T) / 50
    torch.testing.assert_close(batch_sigmoid_ce_cost(inputs, targets), two_matmuls, rtol=1e-12, atol=1e-12)
