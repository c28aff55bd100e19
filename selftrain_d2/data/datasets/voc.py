"""Pascal VOC 2012 semantic segmentation: ``voc_2012_sem_seg_{train,val}`` (1464 / 1449 images) and the
SBD-augmented training set ``voc_2012_sem_seg_train_aug`` (10582 images).

Public layout under ``$DETECTRON2_DATASETS``::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png          palette PNGs: index = class id, 255 = boundary
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png       SBD-augmented labels (plain or palette PNGs, same ids)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,train_aug}.txt

List files hold one image id per line; DeepLab-style lines ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
are read too (the id is the first path's stem). The label PNGs' indices are already train ids (0 = background,
1..20 the classes, 255 = ignore), so nothing needs preparing: Detectron2's readers return palette indices.
"""
import functools
import os

from .register import register_once
from .sem_seg_layout import IGNORE_LABEL, datasets_root

__all__ = ["CLASSES", "SPLITS", "load_voc_sem_seg", "register_voc_sem_seg", "voc_palette"]

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# split -> (label folder, list file) under VOCdevkit/VOC2012.
SPLITS = {
    "train": ("SegmentationClass", "train.txt"),
    "val": ("SegmentationClass", "val.txt"),
    "train_aug": ("SegmentationClassAug", "train_aug.txt"),
}
_README = "datasets/README.md (in the selftrain-d2 repository)"
_SHOWN = 3


def voc_palette(n=256):
    """The VOC colour of each index (bit-interleaved, as in the devkit)."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append([r, g, b])
    return colors


def _read_ids(list_file):
    ids = []
    with open(list_file) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{list_file}:{line_no}: expected an image id or 'IMAGE LABEL', got {line.strip()!r}")
            ids.append(os.path.splitext(os.path.basename(fields[0]))[0])
    return ids


def load_voc_sem_seg(name, voc_root, label_folder, list_name):
    """Records ``{file_name, sem_seg_file_name, image_id}`` of the ids in ``ImageSets/Segmentation/<list_name>``.
    A missing folder, list, image or label fails naming the path(s)."""
    list_file = os.path.join(voc_root, "ImageSets", "Segmentation", list_name)
    image_dir, label_dir = os.path.join(voc_root, "JPEGImages"), os.path.join(voc_root, label_folder)
    for what, path in (("image folder", image_dir), ("label folder", label_dir), ("split list", list_file)):
        if not os.path.exists(path):
            where = "" if os.path.isabs(path) else f" (absolute: {os.path.abspath(path)})"
            raise FileNotFoundError(
                f"Dataset {name!r}: the {what} {path}{where} does not exist. Pascal VOC 2012 is expected under "
                f"$DETECTRON2_DATASETS/VOCdevkit/VOC2012 (SegmentationClassAug and train_aug.txt for the SBD-augmented "
                f"set); see {_README}."
            )
    records, missing = [], []
    for image_id in _read_ids(list_file):
        image = os.path.join(image_dir, image_id + ".jpg")
        label = os.path.join(label_dir, image_id + ".png")
        missing += [p for p in (image, label) if not os.path.isfile(p)]
        records.append({"file_name": image, "sem_seg_file_name": label, "image_id": image_id})
    if not records:
        raise ValueError(f"Dataset {name!r}: the split list {list_file} names no images")
    if missing:
        shown = "".join(f"\n  {p}" for p in missing[:_SHOWN])
        more = f"\n  ... and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise FileNotFoundError(
            f"Dataset {name!r}: {len(missing)} files named by {list_file} are missing:{shown}{more}"
        )
    return records


def register_voc_sem_seg(root=None, prefix="voc_2012_sem_seg"):
    """Register ``<prefix>_{train,val,train_aug}`` lazily (nothing is read until loaded). Returns the names."""
    voc_root = os.path.join(datasets_root() if root is None else os.fspath(root), "VOCdevkit", "VOC2012")
    palette = voc_palette(len(CLASSES))
    entries = []
    for split, (label_folder, list_name) in SPLITS.items():
        name = f"{prefix}_{split}"
        meta = {
            "stuff_classes": list(CLASSES),
            "stuff_colors": palette,
            "image_root": os.path.join(voc_root, "JPEGImages"),
            "sem_seg_root": os.path.join(voc_root, label_folder),
            "ignore_label": IGNORE_LABEL,
            "evaluator_type": "sem_seg",
        }
        loader = functools.partial(load_voc_sem_seg, name, voc_root, label_folder, list_name)
        entries.append((name, ("voc_sem_seg", voc_root, split), loader, meta))
    register_once(entries)
    return [e[0] for e in entries]
