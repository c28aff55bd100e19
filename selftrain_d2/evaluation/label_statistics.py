"""Statistics of label maps: pseudo-label quality against held-out labels, class pixel counts, and the
training set's class shares logged when a training starts.

The maths are pure functions of arrays; the streaming helpers read one PNG at a time, so memory does not
grow with the number of images.
"""
import logging
import os
from collections.abc import Mapping

import numpy as np

from ..data.image_io import UnreadableImageError, read_sem_seg

__all__ = [
    "confusion_matrix",
    "quality_from_confusion",
    "class_pixel_counts",
    "heldout_label_file",
    "pseudo_label_quality",
    "dataset_pixel_counts",
    "sampled_pixel_counts",
    "log_training_set",
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


def heldout_label_file(record, heldout):
    """The held-out label of an image. ``heldout`` is a folder (``<root>/<image_id>.png``, else
    ``<root>/<file stem>.png``) or a mapping from the real path of the image, or its image id, to the label
    file (see ``selftrain_d2.data.datasets.heldout``)."""
    if isinstance(heldout, Mapping):
        path = heldout.get(os.path.realpath(record["file_name"]))
        if path is None and record.get("image_id") is not None:
            path = heldout.get(str(record["image_id"]))
        return path
    for stem in (record.get("image_id"), os.path.splitext(os.path.basename(record["file_name"]))[0]):
        if stem is not None:
            path = os.path.join(heldout, f"{stem}.png")
            if os.path.isfile(path):
                return path
    return None


def pseudo_label_quality(records, heldout, class_names, ignore_label=255):
    """Quality of the pseudo labels in ``records`` (dicts with ``sem_seg_file_name``) against held-out
    labels (``heldout``: see :func:`heldout_label_file`); returns the quality dict plus ``images`` (compared)
    and ``missing`` (no held-out label)."""
    n = len(class_names)
    conf = np.zeros((n, n + 1), dtype=np.int64)
    compared = missing = 0
    for record in records:
        heldout_file = heldout_label_file(record, heldout)
        if heldout_file is None:
            missing += 1
            continue
        try:
            pred = read_sem_seg(record["sem_seg_file_name"], n, ignore_label)
            gt = read_sem_seg(heldout_file, n, ignore_label)
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


# Label maps read for the class shares logged at the start of a training (evenly spaced over the set).
MAX_SHARE_IMAGES = 200


def sampled_pixel_counts(records, num_classes, ignore_label=255, max_images=MAX_SHARE_IMAGES):
    """``(counts, images read)``: :func:`dataset_pixel_counts` over at most ``max_images`` evenly spaced
    records."""
    if len(records) > max_images:
        step = len(records) / max_images
        records = [records[int(i * step)] for i in range(max_images)]
    return dataset_pixel_counts(records, num_classes, ignore_label), len(records)


def _shares(counts, names):
    total = counts.sum()
    return ", ".join(f"{n} {100.0 * c / total if total else 0.0:.1f}%" for n, c in zip(names, counts))


def log_training_set(cfg, records, log=None):
    """Log the size of a training set (``records``: the dataset dicts of ``DATASETS.TRAIN`` and
    ``TRAIN_PSEUDO``) and its class shares: pixel shares of the label maps (sampled), or instances per class;
    a class without any is a warning. Returns ``{class name: share in %}`` (empty without labels)."""
    from detectron2.data import MetadataCatalog

    log = log or logger
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TRAIN_PSEUDO)
    log.info("Training set: %d images from %s", len(records), ", ".join(names) or "-")
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
    semantic = [r for r in records if "sem_seg_file_name" in r]
    instance = [r for r in records if r.get("annotations")]
    if semantic:
        classes = list(meta.get("stuff_classes", None) or []) if meta else []
        classes = classes or [str(i) for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)]
        ignore = meta.get("ignore_label", 255) if meta else 255
        counts, read = sampled_pixel_counts(semantic, len(classes), ignore)
        what = f"class pixel shares (from {read} of {len(semantic)} label maps)"
    elif instance:
        classes = list(meta.get("thing_classes", None) or []) if meta else []
        ids = [int(a["category_id"]) for r in instance for a in r["annotations"] if not a.get("iscrowd", 0)]
        classes = classes or [str(i) for i in range(max(ids, default=-1) + 1)]
        counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(classes))[: len(classes)]
        what = f"instances per class ({int(counts.sum())} in {len(instance)} images)"
    else:
        return {}
    log.info("Training set %s: %s", what, _shares(counts, classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        log.warning("Training set: no %s of class(es) %s: the model cannot learn them from these labels",
                    "pixels" if semantic else "instances", ", ".join(empty))
    total = counts.sum()
    return {c: (100.0 * float(n) / total if total else 0.0) for c, n in zip(classes, counts)}
