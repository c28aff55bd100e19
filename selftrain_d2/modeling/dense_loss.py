"""Per-pixel cross-entropy on hard and soft targets, for every per-pixel model (DeepLabV3+ head, PSPNet, Fast-SCNN).

Hard targets are ``[N, H, W]`` class ids with an ignore value. Soft targets (self-training paper, appendix A.1)
are the teacher's top-k class probabilities of some images of the batch, ``classes`` / ``probs`` ``[N, k, H, W]``
with ``is_soft`` ``[N]``: a soft image's pixel costs ``-sum_j probs_j log p(classes_j)``, a hard one
``-log p(label)``, and every pixel whose hard label is the ignore value costs nothing (the mapper marks a soft
label's masked pixels so). The reductions are the models' own: the mean over labelled pixels (cross_entropy), or
DeepLab's hard pixel mining, the mean of the top share of all pixels' losses (hard_pixel_mining).
"""
import torch
import torch.nn.functional as F
from detectron2.structures import ImageList

__all__ = ["SoftTargets", "soft_cross_entropy", "pixel_cross_entropy", "dense_cross_entropy", "padded_soft_targets"]


class SoftTargets:
    """A batch's soft targets: ``classes`` (long) and ``probs`` (float) ``[N, k, H, W]``, ``is_soft`` ``[N]`` bool."""

    def __init__(self, classes, probs, is_soft):
        self.classes, self.probs, self.is_soft = classes, probs, is_soft


def soft_cross_entropy(log_probs, classes, probs):
    """``[N, H, W]``: ``-sum_j probs[:, j] * log_probs[classes[:, j]]`` for log-probabilities ``[N, C, H, W]``."""
    return -(log_probs.gather(1, classes) * probs).sum(1)


def pixel_cross_entropy(logits, labels, ignore_value, soft=None):
    """``(losses [N, H, W], labelled [N, H, W] bool)``: each pixel's cross-entropy in float32 (0 where ignored)
    against its hard label or, in the images ``soft.is_soft``, against its soft target."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    labelled = labels != ignore_value
    safe = torch.where(labelled, labels, torch.zeros_like(labels))
    losses = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    if soft is not None:
        from_soft = soft_cross_entropy(log_probs, soft.classes, soft.probs.float())
        losses = torch.where(soft.is_soft.view(-1, 1, 1), from_soft, losses)
    return losses * labelled, labelled


def dense_cross_entropy(logits, labels, ignore_value, soft=None, top_k_percent=None):
    """Cross-entropy of class scores ``[N, C, H, W]`` against ``labels`` (and ``soft``) at their resolution.

    ``top_k_percent`` None: the mean over labelled pixels (``F.cross_entropy(..., ignore_index)``); a share in
    (0, 1]: the mean of the largest ``int(share x N x H x W)`` pixel losses, ignored pixels counted as 0
    (Detectron2's ``DeepLabCE``)."""
    losses, labelled = pixel_cross_entropy(logits, labels, ignore_value, soft)
    if top_k_percent is None:
        # Like F.cross_entropy: NaN when no pixel is labelled.
        return losses.sum() / labelled.sum()
    losses = losses.reshape(-1)
    if top_k_percent >= 1.0:
        return losses.mean()
    return torch.topk(losses, int(top_k_percent * losses.numel()))[0].mean()


def padded_soft_targets(batched_inputs, size_divisibility, device, padding_constraints=None):
    """The batch's :class:`SoftTargets`, padded as the label maps are (the mapper's ``sem_seg_soft_classes`` /
    ``sem_seg_soft_probs``), or None when no input has any. Images without them get zero probabilities."""
    if not any("sem_seg_soft_probs" in x for x in batched_inputs):
        return None
    k = max(x["sem_seg_soft_probs"].shape[0] for x in batched_inputs if "sem_seg_soft_probs" in x)
    classes, probs = [], []
    for x in batched_inputs:
        h, w = x["sem_seg"].shape[-2:]
        c = x.get("sem_seg_soft_classes")
        p = x.get("sem_seg_soft_probs")
        c = torch.zeros((k, h, w), dtype=torch.long) if c is None else c.long()
        p = torch.zeros((k, h, w), dtype=torch.float32) if p is None else p
        if c.shape[0] < k:  # fewer stored classes than another image of the batch: no mass on the rest
            c = torch.cat([c, c.new_zeros((k - c.shape[0], h, w))])
            p = torch.cat([p, p.new_zeros((k - p.shape[0], h, w))])
        classes.append(c.to(device))
        probs.append(p.to(device))
    is_soft = torch.tensor(["sem_seg_soft_probs" in x for x in batched_inputs], device=device)
    return SoftTargets(
        ImageList.from_tensors(classes, size_divisibility, 0, padding_constraints).tensor,
        ImageList.from_tensors(probs, size_divisibility, 0.0, padding_constraints).tensor,
        is_soft,
    )
