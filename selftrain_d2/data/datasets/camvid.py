"""CamVid, 11-class protocol (SegNet's release): ``camvid_sem_seg_{train,val,test}`` (367 / 101 / 233 images).

Public layout under ``$DETECTRON2_DATASETS/CamVid``::

    train/<name>.png   trainannot/<name>.png
    val/<name>.png     valannot/<name>.png
    test/<name>.png    testannot/<name>.png

Annotations hold ids 0..10 (the classes below) and 11 (void). ``datasets/prepare_sem_seg.py camvid`` maps 11 to 255
into the prepared root (see ``sem_seg_layout``); the registered datasets read those copies.
"""
import os

from .sem_seg_layout import IGNORE_LABEL, datasets_root, make_lut, prepare_labels, prepared_root, register_sem_seg_pairs

__all__ = ["CLASSES", "FOLDER", "SPLITS", "VOID_ID", "label_mapping", "prepare", "register_camvid"]

FOLDER = "CamVid"
SPLITS = ("train", "val", "test")
VOID_ID = 11

# (name, color) in id order.
CLASSES = (
    ("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("pole", (192, 192, 128)), ("road", (128, 64, 128)),
    ("sidewalk", (60, 40, 222)), ("tree", (128, 128, 0)), ("sign symbol", (192, 128, 128)),
    ("fence", (64, 64, 128)), ("car", (64, 0, 128)), ("pedestrian", (64, 64, 0)), ("bicyclist", (0, 128, 192)),
)


def label_mapping():
    """``{annotation id: train id}``: 0..10 unchanged, void (11) becomes 255."""
    mapping = {i: i for i in range(len(CLASSES))}
    mapping[VOID_ID] = IGNORE_LABEL
    return mapping


def _root(root):
    return datasets_root() if root is None else os.fspath(root)


def _prepared_dir(root, prepared, split):
    base = prepared_root(root) if prepared is None else os.fspath(prepared)
    return os.path.join(base, "camvid", split)


def prepare(root=None, output=None, splits=SPLITS, overwrite=False, log=print):
    """Write train-id copies of the annotations of ``splits`` under ``output`` (default: the prepared root).

    Returns ``{split: (written, skipped)}``.
    """
    lut = make_lut(label_mapping())
    done = {}
    for split in splits:
        src, dst = os.path.join(_root(root), FOLDER, split + "annot"), _prepared_dir(root, output, split)
        done[split] = prepare_labels(src, ".png", dst, lut, overwrite, what=f"CamVid {split}")
        log(f"camvid {split}: {done[split][0]} written, {done[split][1]} already there -> {dst}")
    return done


def register_camvid(root=None, prepared=None, prefix="camvid_sem_seg"):
    """Register ``<prefix>_{train,val,test}`` (read lazily). Returns the names."""
    names = []
    for split in SPLITS:
        label_dir = _prepared_dir(root, prepared, split)
        hint = (
            "Its train-id label maps are converted copies of the annotations: run "
            f"`python datasets/prepare_sem_seg.py camvid --root {_root(root)} "
            f"--output {os.path.dirname(os.path.dirname(label_dir))}`."
        )
        names.append(
            register_sem_seg_pairs(
                f"{prefix}_{split}",
                image_dir=os.path.join(_root(root), FOLDER, split),
                image_ext=".png",
                label_dir=label_dir,
                label_suffix=".png",
                metadata={"stuff_classes": [c[0] for c in CLASSES], "stuff_colors": [list(c[1]) for c in CLASSES]},
                labels_hint=hint,
            )
        )
    return names
