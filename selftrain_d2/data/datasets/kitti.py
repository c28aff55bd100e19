"""KITTI semantic segmentation (Cityscapes label ids): ``kitti_sem_seg_train`` (200 images).

Public layout of ``data_semantics.zip`` under ``$DETECTRON2_DATASETS/data_semantics``::

    training/image_2/<frame>_10.png    training/semantic/<frame>_10.png    (Cityscapes label ids)
    testing/image_2/<frame>_10.png                                         (no labels)

There is no official validation split. ``datasets/prepare_sem_seg.py kitti`` maps the label ids to the 19
Cityscapes train ids with cityscapesscripts' label table (others to 255) into the prepared root (see
``sem_seg_layout``); the registered dataset reads those copies. The test images, unlabeled, can be
registered with ``DATASETS.IMAGE_FOLDERS``.
"""
import os

from .sem_seg_layout import (
    IGNORE_LABEL,
    cityscapes_train_classes,
    datasets_root,
    make_lut,
    prepare_labels,
    prepared_root,
    register_sem_seg_pairs,
)

__all__ = ["FOLDER", "label_mapping", "prepare", "register_kitti"]

FOLDER = "data_semantics"


def label_mapping():
    """``{Cityscapes label id: train id}`` from cityscapesscripts (ids without a train id -> 255)."""
    from cityscapesscripts.helpers.labels import labels

    return {lb.id: (lb.trainId if 0 <= lb.trainId < IGNORE_LABEL else IGNORE_LABEL) for lb in labels if lb.id >= 0}


def _root(root):
    return datasets_root() if root is None else os.fspath(root)


def _prepared_dir(root, prepared):
    base = prepared_root(root) if prepared is None else os.fspath(prepared)
    return os.path.join(base, "kitti", "train")


def prepare(root=None, output=None, overwrite=False, log=print):
    """Write train-id copies of ``training/semantic`` under ``output`` (default: the prepared root).

    Returns ``{"train": (written, skipped)}``.
    """
    src, dst = os.path.join(_root(root), FOLDER, "training", "semantic"), _prepared_dir(root, output)
    done = {"train": prepare_labels(src, ".png", dst, make_lut(label_mapping()), overwrite, what="KITTI train")}
    log(f"kitti train: {done['train'][0]} written, {done['train'][1]} already there -> {dst}")
    return done


def register_kitti(root=None, prepared=None, prefix="kitti_sem_seg"):
    """Register ``<prefix>_train`` (read lazily). Returns the names."""
    label_dir = _prepared_dir(root, prepared)
    names, colors = cityscapes_train_classes()
    hint = (
        "Its train-id label maps are converted from the Cityscapes label ids: run "
        f"`python datasets/prepare_sem_seg.py kitti --root {_root(root)} "
        f"--output {os.path.dirname(os.path.dirname(label_dir))}`."
    )
    return [
        register_sem_seg_pairs(
            f"{prefix}_train",
            image_dir=os.path.join(_root(root), FOLDER, "training", "image_2"),
            image_ext=".png",
            label_dir=label_dir,
            label_suffix=".png",
            metadata={"stuff_classes": names, "stuff_colors": colors},
            labels_hint=hint,
        )
    ]
