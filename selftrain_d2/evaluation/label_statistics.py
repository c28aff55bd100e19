"""Statistics of label maps: pseudo-label quality against held-out labels, and class pixel counts.

The maths are pure functions of arrays; the streaming helpers read one PNG at a time, so memory does not
grow with the number of images.
"""
import logging
import os

import numpy as np

from ..data.image_io import UnreadableImageError, read_sem_seg

__all__ = [
    "confusion_matrix",
    "quality_from_confusion",
    "class_pixel_counts",
    "heldout_label_file",
    "pseudo_label_quality",
    "dataset_pixel_counts",
]

logger = logging.getLogger(__name__)


def confusion_matrix(pred, gt, num_classes, ignore_label=255):
    """(C, C + 1) counts: row = held-out class, column = pseudo class, last column = no pseudo label
    (``pred == ignore_label``). Pixels whose held-out label is ``ignore_label`` are not counted."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    keep = gt != ignore_label
    pred, gt = pred[keep], gt[keep]
    pred = np.where(pred == ignore_label, num_classes, pred)
    if gt.size and (gt.max() >= num_classes or pred.max() > num_classes):
        raise ValueError(f"label ids above the {num_classes} classes: gt max {gt.max()}, pred max {pred.max()}")
    return np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1
    )


def quality_from_confusion(conf, class_names):
    """Coverage (share of labelled pixels given a pseudo label) and, over the covered pixels, per-class IoU,
    mIoU (classes present in either map) and pixel accuracy, in percent."""
    conf = np.asarray(conf, dtype=np.float64)
    covered = conf[:, :-1]
    tp = np.diag(covered)
    union = covered.sum(0) + covered.sum(1) - tp
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)
    total = conf.sum()
    result = {
        "coverage": 100.0 * covered.sum() / total if total else float("nan"),
        "pACC": 100.0 * tp.sum() / covered.sum() if covered.sum() else float("nan"),
        "mIoU": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
    }
    for name, value in zip(class_names, iou):
        result[f"IoU-{name}"] = 100.0 * float(value)
    return result


def class_pixel_counts(label, num_classes, ignore_label=255):
    label = np.asarray(label).astype(np.int64).ravel()
    label = label[label != ignore_label]
    return np.bincount(label, minlength=num_classes)[:num_classes]


def heldout_label_file(record, heldout_root):
    """The held-out label of an image: ``<root>/<image_id>.png``, else ``<root>/<file stem>.png``."""
    for stem in (record.get("image_id"), os.path.splitext(os.path.basename(record["file_name"]))[0]):
        if stem is not None:
            path = os.path.join(heldout_root, f"{stem}.png")
            if os.path.isfile(path):
                return path
    return None


def pseudo_label_quality(records, heldout_root, class_names, ignore_label=255):
    """Quality of the pseudo labels in ``records`` (dicts with ``sem_seg_file_name``) against held-out
    labels; returns the quality dict plus ``images`` (compared) and ``missing`` (no held-out label)."""
    n = len(class_names)
    conf = np.zeros((n, n + 1), dtype=np.int64)
    compared = missing = 0
    for record in records:
        heldout = heldout_label_file(record, heldout_root)
        if heldout is None:
            missing += 1
            continue
        try:
            pred = read_sem_seg(record["sem_seg_file_name"], n, ignore_label)
            gt = read_sem_seg(heldout, n, ignore_label)
        except (UnreadableImageError, ValueError) as e:
            logger.warning("pseudo-label quality: skipped %s (%s)", record["file_name"], e)
            missing += 1
            continue
        conf += confusion_matrix(pred, gt, n, ignore_label)
        compared += 1
    result = quality_from_confusion(conf, class_names)
    result.update(images=compared, missing=missing)
    return result


def dataset_pixel_counts(records, num_classes, ignore_label=255):
    """Per-class pixel counts over the label maps of ``records`` (unreadable ones are skipped and logged)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in records:
        try:
            counts += class_pixel_counts(read_sem_seg(record["sem_seg_file_name"], num_classes, ignore_label),
                                         num_classes, ignore_label)
        except (UnreadableImageError, ValueError) as e:
            logger.warning("pixel counts: skipped %s (%s)", record.get("sem_seg_file_name"), e)
    return counts
