"""Set criterion of Mask2Former: classification and point-sampled mask losses on Hungarian matches,
repeated on every auxiliary decoder layer (deep supervision)."""
import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import nn

from ..utils.precision import autocast_off
from .losses import calculate_uncertainty, dice_loss, sigmoid_ce_loss
from .matcher import check_target_labels

__all__ = [
    "SetCriterion",
    "average_num_masks",
    "matched_target_masks",
    "target_classes",
    "weighted_cross_entropy",
]


def target_classes(indices, targets, num_queries, num_classes, device):
    """[B, Q] int64 class of every query: its matched target's label, or num_classes (no object)."""
    classes = torch.full((len(targets), num_queries), num_classes, dtype=torch.int64, device=device)
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        classes[b, src.to(device)] = target["labels"][tgt.to(target["labels"].device)].to(device)
    return classes


def weighted_cross_entropy(logits, classes, weight):
    """Class-weighted mean cross-entropy, sum_i w[c_i] * nll_i / sum_i w[c_i], as F.cross_entropy
    computes it, except that a zero total weight (no-object weight 0 and no matched query) gives 0
    instead of NaN. logits: [B, Q, K+1]; classes: [B, Q]; weight: [K+1]."""
    nll = F.cross_entropy(logits.transpose(1, 2), classes, weight=weight, reduction="none")
    total_weight = weight[classes].sum()
    return torch.where(total_weight > 0, nll.sum() / total_weight.clamp(min=torch.finfo(nll.dtype).tiny), nll.sum())


def matched_target_masks(targets, indices):
    """[M, H, W] float target masks in match order, zero-padded at the bottom/right to the largest
    mask size of the batch (so normalised point coordinates mean the same thing for every image)."""
    height = max(t["masks"].shape[-2] for t in targets)
    width = max(t["masks"].shape[-1] for t in targets)
    chosen = []
    for (_, tgt), target in zip(indices, targets):
        masks = target["masks"][tgt.to(target["masks"].device)].float()
        pad = (0, width - masks.shape[-1], 0, height - masks.shape[-2])
        chosen.append(F.pad(masks, pad) if any(pad) else masks)
    return torch.cat(chosen)


def average_num_masks(targets, device):
    """Number of target masks per image batch, averaged over DDP ranks, at least 1 (a float)."""
    count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = comm.get_world_size()
    if world_size > 1:
        torch.distributed.all_reduce(count)
    return torch.clamp(count / world_size, min=1).item()


def _batch_and_src(indices, device):
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
    src = torch.cat([src for src, _ in indices]).to(device)
    return batch, src


class SetCriterion(nn.Module):
    """Losses of a set prediction: Hungarian-match the queries to the targets, then
    ``loss_ce`` (all queries, unmatched ones to the no-object class K, whose weight is eos_coef),
    ``loss_mask`` / ``loss_dice`` (matched masks, at ``num_points`` points picked by PointRend's
    uncertainty sampling). With ``aux_outputs``, the same losses per layer i, suffixed ``_{i}``.
    Returns the unweighted losses; ``weight_dict`` is kept for the caller.

    Images without targets are fine: their queries all learn no-object; if the whole batch has
    none, the mask losses are zeros still attached to the graph.
    """

    LOSSES = ("labels", "masks")

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses=LOSSES,
                 num_points=112 * 112, oversample_ratio=3.0, importance_sample_ratio=0.75):
        super().__init__()
        unknown = [name for name in losses if name not in self.LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {list(self.LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def sample_points(self, mask_logits):
        """[R, P, 2] points in [0, 1]^2 for mask logits [R, 1, H, W], most of them where uncertain."""
        return get_uncertain_point_coords_with_randomness(
            mask_logits, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
        )

    def loss_labels(self, outputs, targets, indices, num_masks):
        logits = outputs["pred_logits"].float()
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits has {logits.shape[-1]} classes, expected num_classes + 1 = {self.num_classes + 1}"
            )
        classes = target_classes(indices, targets, logits.shape[1], self.num_classes, logits.device)
        return {"loss_ce": weighted_cross_entropy(logits, classes, self.empty_weight.to(logits.dtype))}

    def loss_masks(self, outputs, targets, indices, num_masks):
        pred_masks = outputs["pred_masks"]
        src_masks = pred_masks[_batch_and_src(indices, pred_masks.device)][:, None]
        if src_masks.shape[0] == 0:
            # An empty slice's sum: exactly 0, never NaN, and still part of the graph.
            zero = pred_masks.flatten()[:0].float().sum()
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        # Point sampling and the point losses in float32 with autocast off, as the reference computes them:
        # sums over thousands of points are not safe in float16.
        with autocast_off(src_masks.device):
            src_masks = src_masks.float()
            tgt_masks = matched_target_masks(targets, indices).to(src_masks)[:, None]
            with torch.no_grad():
                coords = self.sample_points(src_masks)
                point_targets = point_sample(tgt_masks, coords, align_corners=False)[:, 0]
            point_logits = point_sample(src_masks, coords, align_corners=False)[:, 0]
            return {
                "loss_mask": sigmoid_ce_loss(point_logits, point_targets, num_masks),
                "loss_dice": dice_loss(point_logits, point_targets, num_masks),
            }

    def layer_losses(self, outputs, targets, num_masks):
        """Match one layer's outputs to the targets and compute the requested losses."""
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            losses.update(getattr(self, f"loss_{name}")(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs, targets):
        """outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W], optional "aux_outputs":
        list of such dicts}; targets: list of B dicts {"labels": int64 [N], "masks": [N, H', W']}."""
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        check_target_labels(targets, self.num_classes)  # once for all layers' matching
        num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        # Boolean masks become float once here rather than in every layer's matching and mask loss.
        targets = [t if t["masks"].dtype == torch.float32 else {**t, "masks": t["masks"].float()} for t in targets]
        losses = self.layer_losses(final, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_masks).items()})
        return losses

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )
