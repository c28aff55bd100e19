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
    node_patch,
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


def _cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _skd_original(fs, ft, scale):
    """Structured KD's pair-wise term as the original defines it, in plain Python on one image (C x H x W
    lists): max-pool over cells of int(side x scale) (a partial last cell kept), cosine similarity of every
    pair of cells, sum of squared differences over the M x M pairs divided by M^2."""
    h, w = len(ft[0]), len(ft[0][0])
    ph, pw = max(1, int(h * scale)), max(1, int(w * scale))

    def nodes(f):
        return [[max(f[c][y][x] for y in range(y0, min(y0 + ph, h)) for x in range(x0, min(x0 + pw, w)))
                 for c in range(len(f))] for y0 in range(0, h, ph) for x0 in range(0, w, pw)]

    ns, nt = nodes(fs), nodes(ft)
    m = len(nt)
    return sum((_cosine(ns[i], ns[j]) - _cosine(nt[i], nt[j])) ** 2 for i in range(m) for j in range(m)) / m**2


def test_structured_kd_default_pools_to_the_originals_nodes():
    cfg = get_selftrain_cfg()
    cfg.DISTILL.LOSSES = ["skd"]
    loss = build_kd_losses(cfg)["skd"]
    assert (loss.pool_scale, loss.pool, loss.patch) == (0.5, "max", 1)
    assert node_patch((4, 4), 0.5) == (2, 2) and node_patch((5, 7), 0.5) == (2, 3) and node_patch((1, 9), 0.5) == (1, 4)
    # 4x4 maps at scale 0.5: 2x2 cells of 2x2 pixels, four nodes. Student: the top-left cell points along
    # channel 0, the others along channel 1; teacher: all four along channel 0.
    s = torch.zeros(1, 2, 4, 4)
    s[0, 1] = 1.0
    s[0, 0, :2, :2], s[0, 1, :2, :2] = 1.0, 0.0
    t = torch.zeros(1, 3, 4, 4)
    t[0, 0] = 2.0
    t[0, 2, 3, 3] = 0.5  # max pooling keeps it: the bottom-right node of the teacher turns a little
    c = 2 / math.sqrt(4.25)  # cosine of (2, 0, 0) and (2, 0, 0.5)
    # Student similarities: 1 on the diagonal and among the last three nodes, 0 between node 0 and the others.
    # Teacher: 1 except c between node 3 and the others. Differences: (0 - 1) on pairs (0,1), (0,2) and their
    # mirrors; (0 - c) on (0,3), (3,0); (1 - c) on (1,3), (2,3), (3,1), (3,2).
    expected = (4 * 1 + 2 * c**2 + 4 * (1 - c) ** 2) / 16
    out = loss({"features": s}, {"features": t}, KDInputs())["loss_kd_skd"]
    assert out.item() == pytest.approx(expected, rel=1e-5)
    assert out.item() == pytest.approx(_skd_original(s[0].tolist(), t[0].tolist(), 0.5), rel=1e-5)


@pytest.mark.parametrize("size", [(5, 5), (6, 9), (8, 8)])
def test_structured_kd_matches_the_original_formula_on_random_maps(size):
    torch.manual_seed(sum(size))
    s, t = torch.randn(1, 3, *size), torch.randn(1, 4, *size)
    cfg = get_selftrain_cfg()
    cfg.DISTILL.LOSSES = ["skd"]
    pooled = build_kd_losses(cfg)["skd"]({"features": s}, {"features": t}, KDInputs())["loss_kd_skd"]
    assert pooled.item() == pytest.approx(_skd_original(s[0].tolist(), t[0].tolist(), 0.5), rel=1e-4)
    # The per-pixel variant: POOL_SCALE 0 with cells of PATCH 1 pixel, every pixel a node.
    cfg.DISTILL.SKD.POOL_SCALE, cfg.DISTILL.SKD.PATCH = 0.0, 1
    per_pixel = build_kd_losses(cfg)["skd"]({"features": s}, {"features": t}, KDInputs())["loss_kd_skd"]
    assert per_pixel.item() == pytest.approx(_skd_original(s[0].tolist(), t[0].tolist(), 1e-9), rel=1e-4)
    assert per_pixel.item() == pytest.approx(pairwise_similarity_loss(s, t, patch=1).item(), rel=1e-6)


def test_structured_kd_settings_errors():
    cfg = get_selftrain_cfg()
    cfg.DISTILL.LOSSES = ["skd"]
    cfg.DISTILL.SKD.PATCH = 4
    with pytest.raises(ValueError, match="DISTILL.SKD.PATCH=4 is used only with DISTILL.SKD.POOL_SCALE 0"):
        build_kd_losses(cfg)
    cfg.DISTILL.SKD.PATCH, cfg.DISTILL.SKD.POOL_SCALE = 1, 1.5
    with pytest.raises(ValueError, match="DISTILL.SKD.POOL_SCALE=1.5"):
        build_kd_losses(cfg)


def test_intra_class_variation_matches_hand_computation():
    labels = torch.tensor([[[0, 0, 1, 255]]])
    s = torch.tensor([[[[1.0, 0.0, 2.0, 5.0]], [[0.0, 1.0, 0.0, 5.0]]]])
    t = torch.tensor([[[[1.0, 1.0, 3.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]]])
    # Student: class-0 prototype (0.5, 0.5): cosine 1/sqrt(2) for pixels 0 and 1; class 1 alone: cosine 1.
    # Teacher: class-0 prototype (1, 0): cosine 1 for pixels 0 and 1; class 1 alone: cosine 1.
    sim_s = prototype_similarity(s, labels, 2)
    assert sim_s[0, 0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0, 0.0], rel=1e-5)
    # The unlabelled pixel adds 0 but counts: the mean is over all four pixels, as the original's MSELoss.
    expected = 2 * (1 / math.sqrt(2) - 1) ** 2 / 4
    assert intra_class_variation_loss(s, t, labels, 2).item() == pytest.approx(expected, rel=1e-5)


def _ifvd_original(fs, ft, labels, num_classes):
    """IFVD as the original defines it, in plain Python on one image (C x H x W lists, H x W labels): every
    pixel of class k is compared (cosine) with its class's mean feature, every other pixel with itself; the
    loss is the mean over all H x W pixels of the squared student - teacher difference."""
    h, w = len(labels), len(labels[0])
    pixels = [(y, x) for y in range(h) for x in range(w)]

    def similarities(f):
        vec = {p: [f[c][p[0]][p[1]] for c in range(len(f))] for p in pixels}
        centre = dict(vec)
        for k in range(num_classes):
            members = [p for p in pixels if labels[p[0]][p[1]] == k]
            if members:
                mean = [sum(vec[p][c] for p in members) / len(members) for c in range(len(f))]
                centre.update({p: mean for p in members})
        return {p: _cosine(vec[p], centre[p]) for p in pixels}

    ss, st = similarities(fs), similarities(ft)
    return sum((ss[p] - st[p]) ** 2 for p in pixels) / len(pixels)


def test_intra_class_variation_matches_the_original_formula_over_all_pixels():
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (2, 5, 6))
    labels[0, :2] = 255  # 12 of the 60 pixels unlabelled
    labels[1, :, 0] = 255  # 5 more
    s, t = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)
    got = intra_class_variation_loss(s, t, labels, 3)
    per_image = [_ifvd_original(s[i].tolist(), t[i].tolist(), labels[i].tolist(), 3) for i in range(2)]
    assert got.item() == pytest.approx(sum(per_image) / 2, rel=1e-5)
    # Dividing by the labelled pixels only (before issue 24) inflated it by 1 / (labelled share).
    labelled = float(((labels >= 0) & (labels < 3)).float().mean())
    diff = prototype_similarity(s, labels, 3) - prototype_similarity(t, labels, 3)
    labelled_only = float((diff**2).sum()) / float(((labels >= 0) & (labels < 3)).sum())
    assert labelled == pytest.approx(43 / 60) and got.item() == pytest.approx(labelled_only * labelled, rel=1e-5)


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
