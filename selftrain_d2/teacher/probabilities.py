"""Class probabilities of a teacher's predictions, and which pixels are confident enough to label: the maths
that online pseudo labels (guided distillation, :mod:`.filters`) and offline ones (:mod:`selftrain_d2.pseudo_labels`)
share, in one place."""
import torch

from ..modeling.meta_arch.postprocess import semantic_inference

__all__ = ["SCORE_KINDS", "scores_to_probabilities", "mask_classification_probabilities", "ignore_unconfident"]

# What a model's per-pixel "sem_seg" output holds: "logits" (softmax over classes) or non-negative "scores"
# (normalised over classes; MaskFormer-style sums over queries).
SCORE_KINDS = ("logits", "scores")


def scores_to_probabilities(sem_seg, kind):
    """float32 class probabilities ``[C, H, W]`` from a model's ``sem_seg`` output of kind ``kind``."""
    sem_seg = sem_seg.float()
    if kind == "logits":
        return sem_seg.softmax(0)
    if kind == "scores":
        sem_seg = sem_seg.clamp(min=0)
        return sem_seg / sem_seg.sum(0, keepdim=True).clamp(min=1e-12)
    raise ValueError(f"unknown kind of semantic scores {kind!r}; expected one of {SCORE_KINDS}")


def mask_classification_probabilities(pred_logits, mask_logits):
    """Class probabilities ``[K, H, W]`` of a mask-classification model's queries (``pred_logits`` [Q, K+1]
    with "no object" last, ``mask_logits`` [Q, H, W]): each class's share of sum_q P(class | q) x
    sigmoid(mask_q), the scores of Mask2Former's semantic inference."""
    return scores_to_probabilities(semantic_inference(pred_logits.float(), mask_logits.float()), "scores")


def ignore_unconfident(labels, confidence, threshold, ignore_label):
    """``labels`` with ``ignore_label`` where ``confidence`` (the labelled class's probability) is under
    ``threshold``; ``threshold`` 0 keeps every pixel (and returns ``labels`` itself)."""
    if threshold <= 0:
        return labels
    return labels.masked_fill(confidence < threshold, ignore_label)
