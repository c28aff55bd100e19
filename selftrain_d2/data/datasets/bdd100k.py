"""BDD100K semantic segmentation (10K images, 19 Cityscapes train ids): ``bdd100k_sem_seg_{train,val}``.

Public layout of ``bdd100k_seg.zip`` under ``$DETECTRON2_DATASETS``::

    bdd100k/seg/images/{train,val}/<name>.jpg
    bdd100k/seg/labels/{train,val}/<name>_train_id.png     (train ids, 255 = ignore)

The label maps are train ids already, so the datasets read them where they are (no preparation step).
"""
import os

from .sem_seg_layout import cityscapes_train_classes, datasets_root, register_sem_seg_pairs

__all__ = ["FOLDER", "SPLITS", "register_bdd100k"]

FOLDER = os.path.join("bdd100k", "seg")
SPLITS = ("train", "val")
LABEL_SUFFIX = "_train_id.png"


def register_bdd100k(root=None, prefix="bdd100k_sem_seg"):
    """Register ``<prefix>_train`` and ``<prefix>_val`` (read lazily). Returns the names."""
    base = os.path.join(datasets_root() if root is None else os.fspath(root), FOLDER)
    names, colors = cityscapes_train_classes()
    return [
        register_sem_seg_pairs(
            f"{prefix}_{split}",
            image_dir=os.path.join(base, "images", split),
            image_ext=".jpg",
            label_dir=os.path.join(base, "labels", split),
            label_suffix=LABEL_SUFFIX,
            metadata={"stuff_classes": names, "stuff_colors": colors},
        )
        for split in SPLITS
    ]
