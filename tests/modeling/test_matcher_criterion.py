"""Hungarian matcher, set criterion and the mask losses, against hand computations on tiny tensors."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selftrain_d2.modeling import criterion as criterion_module
from selftrain_d2.modeling.criterion import (
    SetCriterion,
    average_num_masks,
    matched_target_masks,
    weighted_cross_entropy,
)
from selftrain_d2.modeling.losses import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    calculate_uncertainty,
    dice_loss,
    sigmoid_ce_loss,
)
from selftrain_d2.modeling.matcher import HungarianMatcher, check_target_labels

# Two masks of five points each, with logits on both sides of 0 and soft and hard targets.
X = np.array([[2.0, -1.0, 0.5, 0.0, -3.0], [-0.5, 1.5, 4.0, -2.0, 0.25]])
T = np.array([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.5, 0.0, 0.0]])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _bce_by_hand(x, t):
    p = _sigmoid(x)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _dice_by_hand(x, t):
    p = _sigmoid(x)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def pixel_centers(h, w):
    """[h*w, 2] (x, y) coordinates in [0, 1]^2 of every pixel center, in row-major order."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2)


def dense_matcher(h, w, **kw):
    """A matcher whose shared points are all the pixel centers of an h x w mask."""
    matcher = HungarianMatcher(num_points=h * w, **kw)
    matcher.sample_points = lambda device: pixel_centers(h, w).to(device)
    return matcher


class FixedMatcher(torch.nn.Module):
    """Returns the given indices whatever the outputs."""

    def __init__(self, indices):
        super().__init__()
        self.indices = [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]

    def forward(self, outputs, targets):
        return self.indices


def dense_criterion(matcher, num_classes, h, w, eos_coef=0.1):
    crit = SetCriterion(num_classes, matcher, weight_dict={}, eos_coef=eos_coef, num_points=h * w)
    crit.sample_points = lambda logits: pixel_centers(h, w)[None].expand(logits.shape[0], -1, -1).to(logits.device)
    return crit


def random_case(gen, batch, num_queries, num_classes, h, w, num_targets):
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes + 1, generator=gen),
        "pred_masks": 2 * torch.randn(batch, num_queries, h, w, generator=gen),
    }
    targets = [
        {
            "labels": torch.randint(num_classes, (n,), generator=gen),
            "masks": torch.rand(n, h, w, generator=gen) > 0.5,
        }
        for n in num_targets
    ]
    return outputs, targets


# ---------------------------------------------------------------- 1. loss terms by hand


def test_sigmoid_ce_loss_by_hand():
    expected = _bce_by_hand(X, T).mean(1).sum() / 3.0
    got = sigmoid_ce_loss(torch.tensor(X), torch.tensor(T), 3.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # One term written out: point 0 of mask 0, logit 2 and target 1, is log(1 + e^-2).
    assert _bce_by_hand(X, T)[0, 0] == pytest.approx(math.log(1 + math.exp(-2.0)))


def test_dice_loss_by_hand():
    expected = _dice_by_hand(X, T).sum() / 2.0
    got = dice_loss(torch.tensor(X), torch.tensor(T), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_batch_costs_by_hand():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    targets = torch.tensor(T)
    ce, dice = batch_sigmoid_ce_cost(inputs, targets), batch_dice_cost(inputs, targets)
    assert ce.shape == dice.shape == (3, 2)
    x = inputs.numpy()
    for q in range(3):
        for n in range(2):
            assert ce[q, n].item() == pytest.approx(_bce_by_hand(x[q], T[n]).mean(), rel=1e-9)
            assert dice[q, n].item() == pytest.approx(_dice_by_hand(x[q:q + 1], T[n:n + 1])[0], rel=1e-9)


def test_batch_ce_cost_stable_for_large_logits():
    inputs = torch.tensor([[80.0, -80.0]])
    cost = batch_sigmoid_ce_cost(inputs, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(cost, torch.tensor([[80.0, 0.0]]))


def test_calculate_uncertainty():
    logits = torch.tensor([[[[-2.0, 0.5], [0.0, 3.0]]]])
    assert torch.equal(calculate_uncertainty(logits), -logits.abs())
    with pytest.raises(ValueError, match="single-channel"):
        calculate_uncertainty(torch.zeros(1, 2, 3))


def test_loss_ce_against_f_cross_entropy_with_explicit_weights():
    num_classes, num_queries, eos = 3, 5, 0.1
    gen = torch.Generator().manual_seed(1)
    outputs, targets = random_case(gen, 2, num_queries, num_classes, 4, 4, [2, 1])
    targets[0]["labels"] = torch.tensor([2, 0])
    targets[1]["labels"] = torch.tensor([1])
    indices = [([3, 0], [0, 1]), ([4], [0])]
    crit = SetCriterion(num_classes, FixedMatcher(indices), {}, eos, losses=("labels",))

    # Enumerate the assignment: query q of image b learns its matched label, otherwise class K.
    classes = torch.full((2, num_queries), num_classes)
    classes[0, 3], classes[0, 0], classes[1, 4] = 2, 0, 1
    weight = torch.tensor([1.0, 1.0, 1.0, eos])
    expected = F.cross_entropy(outputs["pred_logits"].reshape(-1, num_classes + 1), classes.reshape(-1), weight=weight)
    assert crit(outputs, targets)["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_cross_entropy_matches_torch_and_is_zero_without_weight():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, generator=gen)
    classes = torch.tensor([[0, 2, 2, 1], [2, 2, 2, 0]])
    weight = torch.tensor([1.0, 2.0, 0.1])
    expected = F.cross_entropy(logits.transpose(1, 2), classes, weight=weight)
    assert torch.allclose(weighted_cross_entropy(logits, classes, weight), expected)
    # All queries no-object with a no-object weight of 0: torch gives NaN, we give 0.
    only_empty = torch.full((2, 4), 2)
    zero_weight = torch.tensor([1.0, 1.0, 0.0])
    assert F.cross_entropy(logits.transpose(1, 2), only_empty, weight=zero_weight).isnan()
    assert weighted_cross_entropy(logits, only_empty, zero_weight).item() == 0.0


# ---------------------------------------------------------------- 2. matcher against brute force


def _dense_cost_by_hand(logits, masks, labels, tgt_masks, weights):
    """[Q, N] matching cost in float64 numpy from the full masks."""
    logits, masks = logits.double().numpy(), masks.double().flatten(1).numpy()
    tgt = tgt_masks.double().flatten(1).numpy()
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cost = np.zeros((len(logits), len(labels)))
    for q in range(len(logits)):
        for n, label in enumerate(labels.tolist()):
            cost[q, n] = (
                weights[0] * -probs[q, label]
                + weights[1] * _bce_by_hand(masks[q], tgt[n]).mean()
                + weights[2] * _dice_by_hand(masks[q:q + 1], tgt[n:n + 1])[0]
            )
    return cost


def _brute_force_min(cost):
    """Smallest total cost over all one-to-one assignments of min(Q, N) pairs."""
    q, n = cost.shape
    if n <= q:
        return min(sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n))
    return min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(n), q))


@pytest.mark.parametrize("seed", range(12))
def test_matcher_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    num_queries = int(torch.randint(1, 6, (1,), generator=gen))
    num_targets = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(2)]
    weights = (2.0, 5.0, 1.0)
    h, w, num_classes = 3, 4, 4
    outputs, targets = random_case(gen, 2, num_queries, num_classes, h, w, num_targets)
    matcher = dense_matcher(h, w, cost_class=weights[0], cost_mask=weights[1], cost_dice=weights[2])
    indices = matcher(outputs, targets)

    assert len(indices) == 2
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        n = len(target["labels"])
        assert src.dtype == tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(num_queries, n)
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
        cost = _dense_cost_by_hand(outputs["pred_logits"][b], outputs["pred_masks"][b], target["labels"], target["masks"], weights)
        got = cost[src.numpy(), tgt.numpy()].sum()
        assert got == pytest.approx(_brute_force_min(cost), abs=1e-5)


def test_matcher_prefers_the_obvious_match():
    # Query 1 predicts target 0 exactly (class and mask), query 0 predicts target 1.
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1
    masks[1, :, :2] = 1
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, 1, 0] = logits[0, 0, 1] = 5.0
    pred_masks = torch.full((1, 3, 4, 4), -8.0)
    pred_masks[0, 1] = 16 * masks[0] - 8
    pred_masks[0, 0] = 16 * masks[1] - 8
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks.bool()}]
    src, tgt = dense_matcher(4, 4)({"pred_logits": logits, "pred_masks": pred_masks}, targets)[0]
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}


def test_matcher_random_points_and_empty_targets():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    outputs, targets = random_case(gen, 3, 5, 3, 8, 8, [0, 3, 0])
    indices = HungarianMatcher(num_points=50)(outputs, targets)
    for (src, tgt), n in zip(indices, [0, 3, 0]):
        assert len(src) == len(tgt) == n and src.dtype == tgt.dtype == torch.int64
    assert indices[0][0].shape == (0,)


def test_matcher_rejects_non_finite_costs():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = random_case(gen, 1, 3, 2, 4, 4, [2])
    bad_masks = dict(outputs, pred_masks=outputs["pred_masks"].clone())
    bad_masks["pred_masks"][0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="cost_mask.*image 0"):
        dense_matcher(4, 4)(bad_masks, targets)
    with pytest.raises(ValueError, match="cost_dice"):
        dense_matcher(4, 4, cost_mask=0.0)(bad_masks, targets)
    # A non-finite term with weight 0 plays no part.
    dense_matcher(4, 4, cost_mask=0.0, cost_dice=0.0)(bad_masks, targets)

    bad_logits = dict(outputs, pred_logits=outputs["pred_logits"].clone())
    bad_logits["pred_logits"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="cost_class"):
        dense_matcher(4, 4)(bad_logits, targets)


def test_matcher_rejects_bad_targets_and_settings():
    gen = torch.Generator().manual_seed(5)
    outputs, targets = random_case(gen, 1, 3, 2, 4, 4, [2])
    bad_labels = [{"labels": torch.tensor([0, 2]), "masks": targets[0]["masks"]}]
    # Checked once per step by the criterion (one host read for the batch), not in every layer's matching.
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*min 0 max 2"):
        dense_criterion(dense_matcher(4, 4), 2, 4, 4)(outputs, bad_labels)
    with pytest.raises(ValueError, match=r"min -1 max 1"):
        check_target_labels([targets[0], {"labels": torch.tensor([-1]), "masks": targets[0]["masks"][:1]}], 2)
    check_target_labels([{"labels": torch.zeros(0, dtype=torch.int64), "masks": targets[0]["masks"][:0]}], 2)
    with pytest.raises(ValueError, match="labels \\[N\\] and masks"):
        dense_matcher(4, 4)(outputs, [{"labels": torch.tensor([0]), "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0, num_points=10)
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(num_points=0)


# ---------------------------------------------------------------- 3. point-sampled mask losses vs dense


def _dense_mask_losses(pred_masks, targets, indices, num_masks):
    src = torch.cat([pred_masks[b, s] for b, (s, _) in enumerate(indices)]).flatten(1)
    tgt = torch.cat([t["masks"][j].float() for t, (_, j) in zip(targets, indices)]).flatten(1)
    bce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none").mean(1).sum() / num_masks
    p = src.sigmoid()
    dice = (1 - (2 * (p * tgt).sum(1) + 1) / (p.sum(1) + tgt.sum(1) + 1)).sum() / num_masks
    return bce, dice


def test_mask_losses_at_all_pixel_centers_equal_dense_losses():
    h, w = 5, 6
    gen = torch.Generator().manual_seed(6)
    outputs, targets = random_case(gen, 2, 4, 3, h, w, [2, 3])
    indices = [([2, 0], [1, 0]), ([1, 3, 0], [0, 2, 1])]
    crit = dense_criterion(FixedMatcher(indices), 3, h, w)
    losses = crit(outputs, targets)
    bce, dice = _dense_mask_losses(outputs["pred_masks"], targets, [(torch.tensor(i), torch.tensor(j)) for i, j in indices], 5.0)
    assert losses["loss_mask"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice.item(), rel=1e-5)


def test_targets_at_higher_resolution_sample_like_low_resolution():
    # Predictions at stride 4 and targets at full (padded) size, as in the model: a target that is
    # the 2x nearest upsampling of a low-resolution mask gives the losses of the low-resolution one.
    h, w = 4, 5
    gen = torch.Generator().manual_seed(7)
    outputs, targets = random_case(gen, 1, 3, 2, h, w, [2])
    big = [{"labels": targets[0]["labels"], "masks": targets[0]["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2)}]
    crit = dense_criterion(dense_matcher(h, w), 2, h, w)
    torch.testing.assert_close(crit(outputs, big), crit(outputs, targets))


def test_matched_target_masks_pad_to_the_batch_size():
    targets = [
        {"labels": torch.tensor([0]), "masks": torch.ones(1, 2, 3, dtype=torch.bool)},
        {"labels": torch.tensor([1, 0]), "masks": torch.ones(2, 4, 2, dtype=torch.bool)},
    ]
    indices = [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([3]), torch.tensor([1]))]
    masks = matched_target_masks(targets, indices)
    assert masks.shape == (2, 4, 3) and masks.dtype == torch.float32
    assert masks[0].sum() == 6 and masks[0, 2:].sum() == 0
    assert masks[1].sum() == 8 and masks[1, :, 2].sum() == 0


def test_default_uncertainty_sampling_gives_finite_losses():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(8)
    outputs, targets = random_case(gen, 2, 4, 3, 8, 8, [2, 1])
    crit = SetCriterion(3, HungarianMatcher(2.0, 5.0, 5.0, num_points=20), {}, 0.1,
                        num_points=20, oversample_ratio=3.0, importance_sample_ratio=0.75)
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


# ---------------------------------------------------------------- 4. deep supervision and state dict


def test_deep_supervision_keys():
    gen = torch.Generator().manual_seed(9)
    outputs, targets = random_case(gen, 2, 4, 3, 4, 4, [1, 2])
    outputs["aux_outputs"] = [random_case(gen, 2, 4, 3, 4, 4, [])[0] for _ in range(3)]
    losses = dense_criterion(dense_matcher(4, 4), 3, 4, 4)(outputs, targets)
    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == set(names) | {f"{n}_{i}" for n in names for i in range(3)}
    # Each aux layer is matched and scored on its own outputs.
    alone = dense_criterion(dense_matcher(4, 4), 3, 4, 4)(outputs["aux_outputs"][1], targets)
    for name in names:
        assert losses[f"{name}_1"].item() == pytest.approx(alone[name].item(), rel=1e-6)


def test_empty_weight_is_a_buffer_in_the_state_dict():
    crit = SetCriterion(4, HungarianMatcher(num_points=4), {"loss_ce": 2.0}, eos_coef=0.1)
    assert list(crit.state_dict()) == ["empty_weight"]
    torch.testing.assert_close(crit.state_dict()["empty_weight"], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1]))
    assert not list(crit.parameters())
    holder = torch.nn.Module()
    holder.criterion = crit
    assert "criterion.empty_weight" in holder.state_dict()
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(4, HungarianMatcher(num_points=4), {}, 0.1, losses=("labels", "boxes"))


def test_wrong_number_of_classes_is_reported():
    gen = torch.Generator().manual_seed(10)
    outputs, targets = random_case(gen, 1, 3, 4, 4, 4, [1])
    crit = SetCriterion(3, FixedMatcher([([0], [0])]), {}, 0.1, num_points=4)
    with pytest.raises(ValueError, match="expected num_classes \\+ 1 = 4"):
        crit(outputs, targets)


def test_num_masks_is_averaged_over_ranks(monkeypatch):
    targets = [{"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([2])}]
    assert average_num_masks(targets, torch.device("cpu")) == 3.0
    assert average_num_masks([{"labels": torch.tensor([])}], torch.device("cpu")) == 1.0
    # Two ranks, the other holding 5 masks: (3 + 5) / 2.
    monkeypatch.setattr(criterion_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(5.0))
    assert average_num_masks(targets, torch.device("cpu")) == 4.0


# ---------------------------------------------------------------- 5. gradients and empty images


def test_gradients_reach_logits_and_masks_of_every_layer():
    gen = torch.Generator().manual_seed(11)
    outputs, targets = random_case(gen, 2, 4, 3, 6, 6, [2, 1])
    aux, _ = random_case(gen, 2, 4, 3, 6, 6, [])
    leaves = [outputs["pred_logits"], outputs["pred_masks"], aux["pred_logits"], aux["pred_masks"]]
    for t in leaves:
        t.requires_grad_(True)
    outputs["aux_outputs"] = [aux]
    torch.manual_seed(0)
    crit = SetCriterion(3, HungarianMatcher(2.0, 5.0, 5.0, num_points=16), {}, 0.1, num_points=16)
    losses = crit(outputs, targets)
    sum(losses.values()).backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("eos_coef", [0.1, 0.0])
def test_batch_without_targets(eos_coef):
    gen = torch.Generator().manual_seed(12)
    outputs, targets = random_case(gen, 2, 4, 3, 6, 6, [0, 0])
    for t in outputs.values():
        t.requires_grad_(True)
    outputs["aux_outputs"] = [{k: v * 1.0 for k, v in outputs.items()}]
    losses = SetCriterion(3, HungarianMatcher(num_points=16), {}, eos_coef, num_points=16)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    for name in ["loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"]:
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    if eos_coef == 0:
        assert losses["loss_ce"].item() == 0.0
        return
    # Every query learns no-object: plain CE of class K over all queries (weights all eos_coef).
    expected = F.cross_entropy(outputs["pred_logits"].reshape(-1, 4), torch.full((8,), 3))
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(losses.values()).backward()
    grad = outputs["pred_logits"].grad
    assert (grad[..., 3] < 0).all() and (grad[..., :3] > 0).all()
    assert torch.equal(outputs["pred_masks"].grad, torch.zeros_like(outputs["pred_masks"]))


def test_one_image_without_targets_in_the_batch():
    gen = torch.Generator().manual_seed(13)
    outputs, targets = random_case(gen, 2, 4, 3, 6, 6, [0, 2])
    outputs["pred_masks"].requires_grad_(True)
    losses = dense_criterion(dense_matcher(6, 6), 3, 6, 6)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_mask"].backward()
    grad = outputs["pred_masks"].grad
    # Only the two matched queries of image 1 get a mask gradient.
    assert grad[0].abs().sum() == 0
    assert (grad[1].flatten(1).abs().sum(1) > 0).sum() == 2
