"""Hungarian matching of predicted masks to targets, on masks sampled at shared random points."""
import numpy as np
import torch
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..utils.precision import autocast_off
from .losses import batch_dice_cost, batch_sigmoid_ce_cost

__all__ = [
    "HungarianMatcher", "check_target", "check_target_labels", "match_cost", "match_cost_terms", "solve_assignment",
]


def match_cost_terms(probs, labels, point_logits, point_targets, weights):
    """{name: weight x [Q, N] cost} of one image, for the terms of non-zero weight.

    probs: [Q, K+1] class probabilities; labels: [N] int64; point_logits: [Q, P] and
    point_targets: [N, P] masks at the same points; weights: {"cost_class", "cost_mask",
    "cost_dice"} -> float. Terms of weight 0 are skipped, so a non-finite unused term is harmless.
    """
    terms = {
        "cost_class": lambda: -probs[:, labels],
        "cost_mask": lambda: batch_sigmoid_ce_cost(point_logits, point_targets),
        "cost_dice": lambda: batch_dice_cost(point_logits, point_targets),
    }
    return {name: weights[name] * compute() for name, compute in terms.items() if weights[name] != 0}


def match_cost(probs, labels, point_logits, point_targets, weights):
    """[Q, N] matching cost of one image: the sum of :func:`match_cost_terms`."""
    return sum(match_cost_terms(probs, labels, point_logits, point_targets, weights).values())


def non_finite_cost_error(terms):
    """The ValueError for a cost with NaN / inf entries, naming its first non-finite term (an error path:
    it reads the terms back from the device)."""
    for name, cost in terms.items():
        bad = ~torch.isfinite(cost)
        if bad.any():
            return ValueError(
                f"HungarianMatcher: {name} has non-finite entries (NaN/inf) for {int(bad.sum())} of "
                f"{cost.numel()} pairs; the predictions (pred_logits / pred_masks) or target masks contain NaN or inf")
    return ValueError("HungarianMatcher: the matching cost has non-finite entries (NaN/inf)")


def solve_assignment(cost):
    """Minimum-cost one-to-one assignment of a [Q, N] cost: (pred_idx, tgt_idx) int64 tensors, or None when
    the cost has non-finite entries (checked on the host copy the solver needs anyway)."""
    cost = cost.detach().cpu().numpy()
    if not np.isfinite(cost).all():
        return None
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def check_target(target, index):
    """Raise ValueError unless target holds labels [N] and masks [N, H, W] (shapes only: no host read)."""
    labels, masks = target["labels"], target["masks"]
    if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
        raise ValueError(
            f"target {index}: expected labels [N] and masks [N, H, W], got labels {tuple(labels.shape)} "
            f"and masks {tuple(masks.shape)}"
        )


def check_target_labels(targets, num_classes):
    """Raise ValueError unless every target's labels lie in [0, num_classes): one host read for the batch.
    The criterion calls it once per step, not in every layer's matching."""
    labels = [t["labels"] for t in targets if t["labels"].numel()]
    if not labels:
        return
    labels = torch.cat(labels)
    low, high = torch.stack([labels.min(), labels.max()]).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"target labels must lie in [0, {num_classes}) (the no-object class {num_classes} is not a target), "
            f"got min {low} max {high}")


class HungarianMatcher(nn.Module):
    """One-to-one matching of queries to targets, per image, minimising
    cost_class * (-p[target class]) + cost_mask * BCE + cost_dice * dice,
    with the mask terms computed at ``num_points`` random points shared by all masks of the image.

    Returns a list (per image) of (pred_idx, tgt_idx) int64 tensors of length min(Q, N).
    """

    def __init__(self, cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=0):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0")
        if (cost_mask != 0 or cost_dice != 0) and num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be positive when mask costs are used, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def sample_points(self, device):
        """[P, 2] point coordinates in [0, 1]^2 (x, y), shared by predictions and targets."""
        return torch.rand(self.num_points, 2, device=device)

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W]};
        targets: list of B dicts {"labels": [N] in [0, K), "masks": [N, H', W']}. The label range is checked
        by :func:`check_target_labels`, once per step by the criterion rather than for every decoder layer."""
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {pred_logits.shape[0]} predictions")
        weights = {"cost_class": self.cost_class, "cost_mask": self.cost_mask, "cost_dice": self.cost_dice}
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            check_target(target, index=b)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            # Costs in float32 whatever precision the model ran in, with autocast off: under it the mask
            # costs' matmuls over thousands of points would run in float16 again and overflow.
            with autocast_off(pred_masks.device):
                probs = pred_logits[b].float().softmax(-1)
                out_mask = pred_masks[b].float()
                tgt_mask = target["masks"].to(out_mask)
                # All masks of the image as the channels of one map, sampled at the same points.
                coords = self.sample_points(out_mask.device)[None]
                point_logits = point_sample(out_mask[None], coords, align_corners=False)[0]
                point_targets = point_sample(tgt_mask[None], coords, align_corners=False)[0]
                terms = match_cost_terms(probs, labels, point_logits, point_targets, weights)
            assignment = solve_assignment(sum(terms.values()))
            if assignment is None:
                raise ValueError(f"{non_finite_cost_error(terms)} (image {b} of the batch)")
            indices.append(assignment)
        return indices

    def extra_repr(self):
        return f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, num_points={self.num_points}"
