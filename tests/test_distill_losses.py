"""KD losses against hand computations on tiny tensors, and the holistic loss's critic step."""
import math

import pytest
import torch

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.distill import KD_LOSS_REGISTRY, build_kd_losses
from selftrain_d2.distill.losses import (
    HolisticKD,
    KDInputs,
    adam_update_,
    channel_wise_kd_loss,
    intra_class_variation_loss,
    pairwise_similarity_loss,
    pixel_kd_loss,
    prototype_similarity,
)


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# Two classes, three pixels in one row: N=1, C=2, H=1, W=3.
S = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]
T = [[2.0, 0.5, 0.0], [0.0, 0.5, 3.0]]


def _pixel(values, w):
    return [values[0][w], values[1][w]]


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pixel_kd_with_ignore_matches_hand_computation(tau):
    s, t = torch.tensor([S]), torch.tensor([T])
    ignore = torch.tensor([[[False, True, False]]])  # the middle pixel is ignored
    kls = [_kl(_softmax([v / tau for v in _pixel(T, w)]), _softmax([v / tau for v in _pixel(S, w)])) for w in (0, 2)]
    expected = sum(kls) / 2 * tau**2
    assert pixel_kd_loss(s, t, tau, ignore).item() == pytest.approx(expected, rel=1e-5)
    every = [_kl(_softmax([v / tau for v in _pixel(T, w)]), _softmax([v / tau for v in _pixel(S, w)])) for w in range(3)]
    assert pixel_kd_loss(s, t, tau).item() == pytest.approx(sum(every) / 3 * tau**2, rel=1e-5)
    assert pixel_kd_loss(t, t, tau, ignore).item() == pytest.approx(0.0, abs=1e-7)


def test_pixel_kd_all_ignored_is_zero_with_graph():
    s = torch.tensor([S], requires_grad=True)
    loss = pixel_kd_loss(s, torch.tensor([T]), 2.0, torch.ones(1, 1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


def test_pixel_kd_module_takes_ignore_pixels_from_labels():
    cfg = get_selftrain_cfg()
    cfg.DISTILL.LOSSES = ["pixel_kd"]
    cfg.DISTILL.PIXEL_KD.TAU, cfg.DISTILL.PIXEL_KD.WEIGHT = 4.0, 0.5
    loss = build_kd_losses(cfg)["pixel_kd"]
    labels = torch.tensor([[[0, 255, 1]]])
    out = loss({"logits": torch.tensor([S])}, {"logits": torch.tensor([T])}, KDInputs(labels=labels))
    ignore = labels == 255
    assert out["loss_kd_pixel_kd"].item() == pytest.approx(0.5 * pixel_kd_loss(torch.tensor([S]), torch.tensor([T]), 4.0, ignore).item())


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_channel_wise_kd_matches_hand_computation(tau):
    # Each channel is a distribution over the 3 positions.
    expected = sum(_kl(_softmax([v / tau for v in T[c]]), _softmax([v / tau for v in S[c]])) for c in range(2)) / 2
    got = channel_wise_kd_loss(torch.tensor([S]), torch.tensor([T]), tau)
    assert got.item() == pytest.approx(expected * tau**2, rel=1e-5)


def test_pairwise_similarity_matches_hand_computation():
    # Student: 2 channels at 2 positions; teacher: 3 channels (channel counts may differ).
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # positions (1,0) and (0,1): cosine 0
    t = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]], [[0.0, 0.0]]]])  # equal vectors: cosine 1
    # Similarity matrices [[1,0],[0,1]] and [[1,1],[1,1]]: two entries differ by 1 -> mean 2/4.
    assert pairwise_similarity_loss(s, t, patch=1).item() == pytest.approx(0.5, rel=1e-6)
    # Max pooling over 1x2 cells leaves one position per map: similarities 1 and 1.
    assert pairwise_similarity_loss(s, t, patch=2).item() == pytest.approx(0.0, abs=1e-7)


def test_intra_class_variation_matches_hand_computation():
    labels = torch.tensor([[[0, 0, 1, 255]]])
    s = torch.tensor([[[[1.0, 0.0, 2.0, 5.0]], [[0.0, 1.0, 0.0, 5.0]]]])
    t = torch.tensor([[[[1.0, 1.0, 3.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]]])
    # Student: class-0 prototype (0.5, 0.5): cosine 1/sqrt(2) for pixels 0 and 1; class 1 alone: cosine 1.
    # Teacher: class-0 prototype (1, 0): cosine 1 for pixels 0 and 1; class 1 alone: cosine 1.
    sim_s = prototype_similarity(s, labels, 2)
    assert sim_s[0, 0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0, 0.0], rel=1e-5)
    expected = 2 * (1 / math.sqrt(2) - 1) ** 2 / 3  # three labelled pixels
    assert intra_class_variation_loss(s, t, labels, 2).item() == pytest.approx(expected, rel=1e-5)


def test_adam_update_matches_torch_adam():
    torch.manual_seed(0)
    p1 = torch.randn(5)
    p2 = p1.clone().requires_grad_(True)
    m, v = torch.zeros(5), torch.zeros(5)
    opt = torch.optim.Adam([p2], lr=0.01, betas=(0.9, 0.99))
    for step in range(1, 4):
        g = torch.randn(5)
        adam_update_(p1, g, m, v, step, 0.01, (0.9, 0.99))
        p2.grad = g.clone()
        opt.step()
    assert torch.allclose(p1, p2.detach(), atol=1e-6)


def test_holistic_steps_its_critic_and_sends_gradient_only_to_the_student():
    torch.manual_seed(0)
    cfg = get_selftrain_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.DISTILL.HOLISTIC.CHANNELS = [4]
    cfg.DISTILL.HOLISTIC.CONDITION_ON_IMAGE = True
    loss = HolisticKD(cfg)
    loss.train()
    assert all(not p.requires_grad for p in loss.discriminator.parameters())
    before = [p.clone() for p in loss.discriminator.parameters()]
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    inputs = KDInputs(images=torch.randn(2, 3, 16, 16))
    out = loss({"logits": student}, {"logits": torch.randn(2, 3, 8, 8)}, inputs)
    assert loss.adam_step.item() == 1
    # Every conv weight moves; the last bias cannot (it cancels in E[D(fake)] - E[D(real)]).
    moved = [not torch.equal(a, b) for a, b in zip(before, loss.discriminator.parameters()) if a.dim() > 1]
    assert moved and all(moved)
    # Adam's first step moves every weight by about lr (bias-corrected m / sqrt(v) = sign(grad)).
    w0 = next(loss.discriminator.parameters())
    assert (w0 - before[0]).abs().max().item() == pytest.approx(cfg.DISTILL.HOLISTIC.LR, rel=1e-3)
    out["loss_kd_holistic"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    loss.eval()
    loss({"logits": student}, {"logits": torch.randn(2, 3, 8, 8)}, inputs)
    assert loss.adam_step.item() == 1  # no critic step outside training


def test_registry_and_unknown_loss_error():
    assert {"pixel_kd", "cwd", "skd", "ifvd", "holistic"} <= {n for n, _ in KD_LOSS_REGISTRY}
    cfg = get_selftrain_cfg()
    cfg.DISTILL.LOSSES = ["pixel_kd", "not_a_loss"]
    with pytest.raises(KeyError, match="DISTILL.LOSSES: unknown KD loss 'not_a_loss'"):
        build_kd_losses(cfg)
