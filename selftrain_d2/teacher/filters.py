"""Pseudo labels from a teacher's raw per-query predictions: pure functions, chosen by name.

One image's queries become :class:`Candidates` (class probabilities with the no-object column,
mask logits); a chain of registered filters, named in ``SEMISUP.ONLINE_PSEUDO_LABELS.FILTERS``, drops or
scores them, and :func:`instance_pseudo_labels` returns what is left as training targets. A filter
is ``fn(candidates, **params) -> candidates``; its ``params`` come from the config through the
``from_config`` given at registration::

    @register_pseudo_filter("my_filter", from_config=lambda cfg: {"k": cfg.MY.K})
    def my_filter(c, *, k): return c.select(...)

Semantic models get per-pixel labels instead (:func:`semantic_pseudo_labels`): the class with the
highest score, and the ignore label where its share of the scores is below the threshold.
"""
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from ..utils.registry import NamedRegistry
from .probabilities import ignore_unconfident, mask_classification_probabilities

__all__ = [
    "PSEUDO_FILTER_REGISTRY",
    "Candidates",
    "register_pseudo_filter",
    "candidates_from_queries",
    "drop_no_object",
    "class_confidence",
    "binarize_masks",
    "soft_mask_area",
    "min_mask_area",
    "mask_quality",
    "apply_filters",
    "instance_pseudo_labels",
    "semantic_pseudo_labels",
    "build_pseudo_filters",
    "PseudoLabeler",
]

PSEUDO_FILTER_REGISTRY = NamedRegistry("PSEUDO_FILTER")
PSEUDO_FILTER_REGISTRY.__doc__ = "Pseudo-label filters: fn(Candidates, **params) -> Candidates (pure)."


@dataclass(frozen=True)
class Candidates:
    """Candidate objects of one image, one row per kept query.

    ``probs`` [N, K+1] softmax class probabilities (last column: no object); ``scores`` / ``labels`` [N]
    the best real class and its probability; ``mask_logits`` [N, h, w] over the padded input at the
    model's mask resolution; ``pad_size`` (H, W) that padded input; ``image_size`` (h_i, w_i) the image
    in its top-left corner. ``masks`` (bool [N, h_i, w_i]) and ``quality`` [N] are set by filters.
    """

    probs: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    mask_logits: torch.Tensor
    pad_size: Tuple[int, int]
    image_size: Tuple[int, int]
    masks: Optional[torch.Tensor] = None
    quality: Optional[torch.Tensor] = None

    def __len__(self):
        return int(self.scores.shape[0])

    @property
    def num_classes(self):
        return int(self.probs.shape[-1]) - 1

    def select(self, keep):
        """The candidates where ``keep`` (bool [N] or indices) holds."""
        return replace(
            self,
            probs=self.probs[keep],
            scores=self.scores[keep],
            labels=self.labels[keep],
            mask_logits=self.mask_logits[keep],
            masks=None if self.masks is None else self.masks[keep],
            quality=None if self.quality is None else self.quality[keep],
        )


def register_pseudo_filter(name, from_config=None):
    """Register ``fn(candidates, **params)``; ``from_config(cfg) -> params`` (default: no params)."""

    def deco(fn):
        fn.from_config = from_config if from_config is not None else (lambda cfg: {})
        PSEUDO_FILTER_REGISTRY.register(fn, name)
        return fn

    return deco


def candidates_from_queries(pred_logits, pred_masks, pad_size, image_size):
    """All queries of one image: ``pred_logits`` [Q, K+1], ``pred_masks`` [Q, h, w] (logits)."""
    probs = F.softmax(pred_logits.float(), dim=-1)
    scores, labels = probs[:, :-1].max(dim=-1)
    return Candidates(probs, scores, labels, pred_masks, tuple(pad_size), tuple(image_size))


def _pseudo_cfg(cfg):
    return cfg.SEMISUP.ONLINE_PSEUDO_LABELS


@register_pseudo_filter("drop_no_object")
def drop_no_object(c):
    """Drop queries whose most probable class is "no object"."""
    return c.select(c.probs.argmax(dim=-1) != c.num_classes)


@register_pseudo_filter(
    "class_confidence",
    from_config=lambda cfg: {
        "threshold": _pseudo_cfg(cfg).SCORE_THRESHOLD,
        "class_thresholds": tuple(_pseudo_cfg(cfg).CLASS_THRESHOLDS),
    },
)
def class_confidence(c, *, threshold=0.7, class_thresholds=()):
    """Keep candidates whose class probability is at least ``threshold``, or, when given,
    ``class_thresholds[label]`` (one per class)."""
    if class_thresholds:
        if len(class_thresholds) != c.num_classes:
            raise ValueError(
                f"SEMISUP.ONLINE_PSEUDO_LABELS.CLASS_THRESHOLDS has {len(class_thresholds)} values; the model has "
                f"{c.num_classes} classes (one threshold per class, or [] to use SCORE_THRESHOLD for all)"
            )
        per_label = torch.as_tensor(class_thresholds, dtype=c.scores.dtype, device=c.scores.device)[c.labels]
        return c.select(c.scores >= per_label)
    return c.select(c.scores >= threshold)


@register_pseudo_filter("binarize_masks", from_config=lambda cfg: {"threshold": _pseudo_cfg(cfg).MASK_THRESHOLD})
def binarize_masks(c, *, threshold=0.5):
    """Masks at the image's pixels: mask logits upsampled (bilinear) to the padded input, cropped to
    the image, foreground where sigmoid >= ``threshold``. Also sets ``quality`` to the mean foreground
    probability inside each binary mask (0 for an empty mask)."""
    h, w = c.image_size
    logits = c.mask_logits.float()
    if len(c) and tuple(logits.shape[-2:]) != tuple(c.pad_size):
        logits = F.interpolate(logits[None], size=c.pad_size, mode="bilinear", align_corners=False)[0]
    probs = logits[:, :h, :w].sigmoid()
    masks = probs >= threshold
    area = masks.flatten(1).sum(1)
    quality = torch.where(masks, probs, 0).flatten(1).sum(1) / area.clamp(min=1)
    return replace(c, masks=masks, quality=quality)


@register_pseudo_filter("soft_mask_area", from_config=lambda cfg: {"min_area": _pseudo_cfg(cfg).MIN_SOFT_MASK_AREA})
def soft_mask_area(c, *, min_area=5.0):
    """Keep candidates whose soft area, the sum of sigmoid(mask logit) over the whole mask map at the mask
    head's own resolution (padding included), is above ``min_area``: the reference's test for an empty mask.
    It needs no binary masks and counts cells of the mask map, not input pixels (at the mask head's stride 4,
    an area of 5 is about 80 input pixels; :func:`min_mask_area` counts binary input pixels)."""
    area = c.mask_logits.float().sigmoid().flatten(1).sum(1)
    return c.select(area > min_area)


def _need_masks(c, name):
    if c.masks is None:
        raise ValueError(f"pseudo-label filter {name!r} needs binary masks: put 'binarize_masks' before it in "
                         "SEMISUP.ONLINE_PSEUDO_LABELS.FILTERS")


@register_pseudo_filter("min_mask_area", from_config=lambda cfg: {"min_area": _pseudo_cfg(cfg).MIN_MASK_AREA})
def min_mask_area(c, *, min_area=5):
    """Drop candidates whose binary mask has fewer than ``min_area`` pixels."""
    _need_masks(c, "min_mask_area")
    return c.select(c.masks.flatten(1).sum(1) >= min_area)


@register_pseudo_filter(
    "mask_quality", from_config=lambda cfg: {"threshold": _pseudo_cfg(cfg).MASK_QUALITY_THRESHOLD}
)
def mask_quality(c, *, threshold=0.0):
    """Drop candidates whose mask quality (mean foreground probability inside the binary mask) is
    below ``threshold``, and rescore the rest by class probability x quality (Mask2Former's score)."""
    _need_masks(c, "mask_quality")
    keep = c.quality >= threshold
    c = c.select(keep)
    return replace(c, scores=c.scores * c.quality)


def build_pseudo_filters(cfg):
    """``[(fn, params)]`` for the names in ``SEMISUP.ONLINE_PSEUDO_LABELS.FILTERS``, in order."""
    steps = []
    for name in _pseudo_cfg(cfg).FILTERS:
        if name not in PSEUDO_FILTER_REGISTRY:
            raise KeyError(f"SEMISUP.ONLINE_PSEUDO_LABELS.FILTERS: unknown filter {name!r}; registered: "
                           f"{sorted(k for k, _ in PSEUDO_FILTER_REGISTRY)}")
        fn = PSEUDO_FILTER_REGISTRY.get(name)
        steps.append((fn, dict(fn.from_config(cfg))))
    return steps


def apply_filters(c, steps):
    for fn, params in steps:
        c = fn(c, **params)
    return c


def instance_pseudo_labels(pred_logits, pred_masks, pad_size, image_size, steps):
    """Targets of one image from its queries: ``{"labels": int64 [N], "masks": bool [N, h_i, w_i],
    "scores": [N]}`` after the filter chain ``steps`` (masks are binarized at 0.5 if no step did it)."""
    c = apply_filters(candidates_from_queries(pred_logits, pred_masks, pad_size, image_size), steps)
    if c.masks is None:
        c = binarize_masks(c)
    return {"labels": c.labels.long(), "masks": c.masks, "scores": c.scores}


def semantic_pseudo_labels(pred_logits, pred_masks, pad_size, image_size, *, threshold, ignore_label):
    """Label map (int64 [h_i, w_i]) of one image from its queries: per pixel the class maximising
    sum_q P(class | q) x sigmoid(mask_q), or ``ignore_label`` where that class's share of the summed
    class scores is below ``threshold``."""
    h, w = image_size
    masks = pred_masks.float()
    if tuple(masks.shape[-2:]) != tuple(pad_size):
        masks = F.interpolate(masks[None], size=pad_size, mode="bilinear", align_corners=False)[0]
    share, labels = mask_classification_probabilities(pred_logits, masks[:, :h, :w]).max(dim=0)
    return ignore_unconfident(labels, share, threshold, ignore_label)


class PseudoLabeler:
    """A batch of raw teacher outputs -> one target per image: ``{"labels", "masks", "scores"}``
    (``SEMISUP.ONLINE_PSEUDO_LABELS.TARGETS`` "instance") or an int64 label map ("semantic")."""

    @configurable
    def __init__(self, *, targets, steps, semantic_threshold=0.7, ignore_label=255):
        if targets not in ("instance", "semantic"):
            raise ValueError(f"SEMISUP.ONLINE_PSEUDO_LABELS.TARGETS must be 'instance' or 'semantic', got {targets!r}")
        self.targets = targets
        self.steps = steps
        self.semantic_threshold = semantic_threshold
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg):
        return {
            "targets": _pseudo_cfg(cfg).TARGETS,
            "steps": build_pseudo_filters(cfg),
            "semantic_threshold": _pseudo_cfg(cfg).SCORE_THRESHOLD,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def __call__(self, outputs, pad_size, image_sizes):
        results = []
        for logits, masks, size in zip(outputs["pred_logits"], outputs["pred_masks"], image_sizes):
            if self.targets == "semantic":
                results.append(semantic_pseudo_labels(logits, masks, pad_size, size, threshold=self.semantic_threshold,
                                                      ignore_label=self.ignore_label))
            else:
                results.append(instance_pseudo_labels(logits, masks, pad_size, size, self.steps))
        return results

    def is_empty(self, target):
        """True when a target holds nothing to learn from (no object, or every pixel ignored)."""
        if self.targets == "semantic":
            return bool((target == self.ignore_label).all())
        return len(target["labels"]) == 0
