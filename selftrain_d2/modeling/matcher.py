"""Hungarian matching of predicted masks to targets, on masks sampled at shared random points."""
import torch
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..utils.precision import autocast_off
from .losses import batch_dice_cost, batch_sigmoid_ce_cost

__all__ = ["HungarianMatcher", "check_target", "match_cost", "solve_assignment"]


def match_cost(probs, labels, point_logits, point_targets, weights):
    """[Q, N] matching cost of one image.

    probs: [Q, K+1] class probabilities; labels: [N] int64; point_logits: [Q, P] and
    point_targets: [N, P] masks at the same points; weights: {"cost_class", "cost_mask",
    "cost_dice"} -> float. Terms of weight 0 are skipped, so a non-finite unused term is harmless.
    Raises ValueError naming the first term that is not finite.
    """
    terms = {
        "cost_class": lambda: -probs[:, labels],
        "cost_mask": lambda: batch_sigmoid_ce_cost(point_logits, point_targets),
        "cost_dice": lambda: batch_dice_cost(point_logits, point_targets),
    }
    total = probs.new_zeros(probs.shape[0], labels.shape[0])
    for name, compute in terms.items():
        if weights[name] == 0:
            continue
        cost = compute()
        if not torch.isfinite(cost).all():
            raise ValueError(
                f"HungarianMatcher: {name} has non-finite entries (NaN/inf) for "
                f"{(~torch.isfinite(cost)).sum().item()} of {cost.numel()} pairs; "
                "the predictions (pred_logits / pred_masks) or target masks contain NaN or inf"
            )
        total = total + weights[name] * cost
    return total


def solve_assignment(cost):
    """Minimum-cost one-to-one assignment of a [Q, N] cost: (pred_idx, tgt_idx) int64 tensors."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def check_target(target, num_classes, index):
    """Raise ValueError unless target holds labels [N] in [0, num_classes) and masks [N, H, W]."""
    labels, masks = target["labels"], target["masks"]
    if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
        raise ValueError(
            f"target {index}: expected labels [N] and masks [N, H, W], got labels {tuple(labels.shape)} "
            f"and masks {tuple(masks.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"target {index}: labels must lie in [0, {num_classes}) (the no-object class {num_classes} is "
            f"not a target), got min {labels.min().item()} max {labels.max().item()}"
        )


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
        targets: list of B dicts {"labels": [N], "masks": [N, H', W']}."""
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {pred_logits.shape[0]} predictions")
        weights = {"cost_class": self.cost_class, "cost_mask": self.cost_mask, "cost_dice": self.cost_dice}
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            check_target(target, num_classes=pred_logits.shape[-1] - 1, index=b)
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
                try:
                    cost = match_cost(probs, labels, point_logits, point_targets, weights)
                except ValueError as e:
                    raise ValueError(f"{e} (image {b} of the batch)") from None
            indices.append(solve_assignment(cost))
        return indices

    def extra_repr(self):
        return f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, num_points={self.num_points}"
