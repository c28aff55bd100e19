"""Class-balanced pseudo labels: one offset per class on the teacher's log-probabilities, chosen so that each
class takes the share of the pseudo-label pixels that it takes in the labelled set.

A teacher trained on few labels under-predicts thin and rare classes, and a student trained on its labels
learns the bias (on the demo scenes the pseudo labels hold 0.1-0.3 % pole pixels where the images hold 0.8 %).
CBST (Zou et al., ECCV 2018) balances with per-class confidence thresholds, which can only remove pixels; an
offset per class can also give a class the pixels it lost. The offsets are fitted on a sample of pixels of
the unlabelled images, then applied to every image: ``p'(c) = p(c) exp(b_c) / sum_k p(k) exp(b_k)``. The
balanced probabilities replace the teacher's everywhere downstream (hard label, confidence, threshold, soft
top-k).

The maths here is pure (numpy / torch in, arrays out); :mod:`.generate` runs the teacher and does the I/O.
"""
import numpy as np
import torch

from ..data.image_io import read_sem_seg
from ..evaluation.label_statistics import class_pixel_counts

__all__ = ["label_class_shares", "sample_pixels", "argmax_shares", "fit_class_offsets", "apply_class_offsets"]

# Offsets are kept within +-log(1e4): a class absent from the target would otherwise be pushed to -inf, and a
# class the teacher never predicts to +inf.
MAX_OFFSET = float(np.log(1e4))


def label_class_shares(records, num_classes, ignore_label):
    """float64 ``[num_classes]``: the share of the labelled pixels (ignore excluded) each class holds in the
    ``sem_seg_file_name`` labels of ``records`` (ids other than classes and ``ignore_label``: an error naming
    the file)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in records:
        path = record.get("sem_seg_file_name")
        if path is None:
            raise ValueError(
                f"class-balanced pseudo labels need the labelled set's class shares, but image "
                f"{record.get('file_name')} has no sem_seg_file_name; set OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SHARES"
            )
        counts += class_pixel_counts(read_sem_seg(path, num_classes, ignore_label), num_classes, ignore_label)
    if counts.sum() == 0:
        raise ValueError("the labelled set holds no labelled pixel: no class shares to balance the pseudo labels to")
    return counts / counts.sum()


def sample_pixels(probs, count, seed):
    """float32 numpy ``[min(count, H*W), C]``: the class probabilities of ``count`` pixels of ``probs``
    ``[C, H, W]`` drawn without replacement by a generator seeded with ``seed``."""
    flat = probs.reshape(probs.shape[0], -1)
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(flat.shape[1], generator=generator)[: int(count)].to(flat.device)
    return flat[:, index].t().float().cpu().numpy()


def argmax_shares(log_probs, offsets):
    """float64 ``[C]``: the share of the rows of ``log_probs`` ``[N, C]`` whose argmax, after adding
    ``offsets`` ``[C]``, is each class (ties to the lower class id)."""
    top = np.argmax(log_probs + offsets[None, :], axis=1)
    return np.bincount(top, minlength=log_probs.shape[1]) / max(1, log_probs.shape[0])


def fit_class_offsets(probs, target_shares, iterations=300, tolerance=0.05):
    """``(offsets [C], shares [C])``: per-class offsets of the log-probabilities under which the argmax shares of
    the pixels ``probs`` ``[N, C]`` approach ``target_shares`` ``[C]``, and the shares they reach.

    Each iteration moves every offset by half the log-ratio of target and reached share (with a floor of one
    pixel, so an absent class stays finite), with a step that shrinks over the iterations, and stops once every
    class is within ``tolerance`` (relative) of its target. The best iterate (smallest largest log-ratio) is
    returned; offsets sum to zero, since only their differences matter.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"fit_class_offsets needs a non-empty [N, C] array of probabilities, got {probs.shape}")
    target = np.asarray(target_shares, dtype=np.float64)
    if target.shape != (probs.shape[1],) or (target < 0).any() or target.sum() <= 0:
        raise ValueError(f"target shares must be {probs.shape[1]} non-negative numbers with a positive sum, "
                         f"got {target_shares!r}")
    target = target / target.sum()
    log_probs = np.log(np.clip(probs, 1e-12, None))
    floor = 1.0 / probs.shape[0]
    offsets = np.zeros(probs.shape[1])
    best = (np.inf, offsets, argmax_shares(log_probs, offsets))
    for i in range(int(iterations)):
        shares = argmax_shares(log_probs, offsets)
        ratio = np.log((target + floor) / (shares + floor))
        error = np.abs(ratio).max()
        if error < best[0]:
            best = (error, offsets.copy(), shares)
        if error < np.log1p(tolerance):
            break
        offsets = np.clip(offsets + 0.5 / (1.0 + i / 50.0) * ratio, -MAX_OFFSET, MAX_OFFSET)
        offsets -= offsets.mean()
    return best[1], best[2]


def apply_class_offsets(probs, offsets):
    """Class probabilities ``[C, H, W]`` (tensor) reweighted by ``exp(offsets)`` and renormalised over classes,
    on ``probs``' device."""
    offsets = torch.as_tensor(np.asarray(offsets), dtype=torch.float32, device=probs.device)
    weighted = probs * torch.exp(offsets - offsets.max()).view(-1, *([1] * (probs.dim() - 1)))
    return weighted / weighted.sum(0, keepdim=True).clamp(min=1e-30)
