"""Held-out labels of an unlabelled dataset (``DATASETS.HELDOUT``): never trained on, they only score the
pseudo labels a teacher writes for its images (the recipe report).

``[DATASET, LABELS]``: ``LABELS`` is either a registered dataset whose records carry ``sem_seg_file_name``
for the same image files (a ``DATASETS.SEM_SEG`` or ``SEM_SEG_FROM_COCO`` dataset, say), or a folder (a
value with a path separator) of ``<image_id>.png`` / ``<file stem>.png`` label maps. It is recorded in the
metadata of ``DATASET`` as ``heldout_dataset`` or ``heldout_sem_seg_root``. The unlabelled half of a split
(``DATASETS.SPLITS``) needs no entry: its base dataset holds the labels.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..records import image_key
from .register import expand_path, is_path_like

__all__ = ["heldout_labels", "register_heldout"]


def register_heldout(dataset, labels):
    """Record ``labels`` (a dataset name or a folder) as the held-out labels of ``dataset``; the same again
    does nothing, other labels are a ValueError naming both."""
    if dataset not in DatasetCatalog.list():
        raise KeyError(f"DATASETS.HELDOUT: dataset {dataset!r} is not registered (check its spelling, or register it "
                       "with another DATASETS key)")
    if is_path_like(labels):
        key, value = "heldout_sem_seg_root", expand_path(labels)
    else:
        if labels not in DatasetCatalog.list():
            raise KeyError(f"DATASETS.HELDOUT [{dataset!r}, {labels!r}]: {labels!r} is neither a registered dataset "
                           "nor a folder (a folder needs a path separator: ./labels)")
        key, value = "heldout_dataset", labels
    meta = MetadataCatalog.get(dataset)
    for other in ("heldout_dataset", "heldout_sem_seg_root"):
        old = meta.get(other, None)
        if old is not None and (other, old) != (key, value):
            raise ValueError(f"DATASETS.HELDOUT: dataset {dataset!r} already has the held-out labels {old!r} "
                             f"({other}); cannot set them to {value!r}")
    if meta.get(key, None) is None:
        meta.set(**{key: value})


def heldout_labels(dataset):
    """``(labels, classes, source)`` of the held-out labels of ``dataset``, or ``(None, None, None)``.

    ``labels``: a dict ``{absolute image path or image key: label file}``, or a folder (str); ``classes``
    the held-out dataset's ``stuff_classes`` (None for a folder); ``source`` says where they come from.
    Looked up in this order: ``heldout_dataset``, ``heldout_sem_seg_root``, the base of a split's unlabelled
    half.
    """
    if dataset not in DatasetCatalog.list():
        return None, None, None
    meta = MetadataCatalog.get(dataset)
    name = meta.get("heldout_dataset", None)
    if name is None and meta.get("heldout_sem_seg_root", None):
        return meta.heldout_sem_seg_root, None, f"folder {meta.heldout_sem_seg_root}"
    if name is None and meta.get("split_unlabeled", None) == dataset:
        name = meta.get("split_base", None)
    if name is None or name not in DatasetCatalog.list():
        return None, None, None
    records = [r for r in DatasetCatalog.get(name) if "sem_seg_file_name" in r]
    if not records:
        return None, None, None
    lookup = {os.path.realpath(r["file_name"]): r["sem_seg_file_name"] for r in records}
    keys = [image_key(r) for r in records]
    if len(set(keys)) == len(keys):  # ids that repeat (several COCO files) cannot stand for an image
        lookup.update({k: r["sem_seg_file_name"] for k, r in zip(keys, records)})
    return lookup, MetadataCatalog.get(name).get("stuff_classes", None), f"dataset {name!r}"
