"""Mapillary Vistas, research edition (v1.2 labels, 66 ids): ``mapillary_vistas_sem_seg_{train,val}``.

Public layout under ``$DETECTRON2_DATASETS/mapillary_vistas`` (the v2.0 download keeps the v1.2 labels in
``v1.2/labels``; the v1.1/v1.2 downloads have ``labels`` directly)::

    training/images/<key>.jpg      training/v1.2/labels/<key>.png   (or training/labels/<key>.png)
    validation/images/<key>.jpg    validation/v1.2/labels/<key>.png

Label PNGs hold the index into ``config_v1.2.json``'s label list: 0..64 are the classes, 65 is
"Unlabeled". ``datasets/prepare_sem_seg.py mapillary_vistas`` maps 65 to 255 into the prepared root (see
``sem_seg_layout``); the registered datasets read those copies and evaluate the 65 classes.
"""
import os

from .sem_seg_layout import (
    IGNORE_LABEL,
    datasets_root,
    make_lut,
    prepare_labels,
    prepared_root,
    register_sem_seg_pairs,
)

__all__ = ["CLASSES", "FOLDER", "SPLITS", "UNLABELED_ID", "label_mapping", "prepare", "register_mapillary_vistas",
           "source_label_dir"]

FOLDER = "mapillary_vistas"
SPLITS = {"train": "training", "val": "validation"}
# Searched in this order inside <split folder>.
LABEL_DIRS = ("v1.2/labels", "labels")
UNLABELED_ID = 65

# (readable name, color) in id order, as listed by config_v1.2.json; id 65 "Unlabeled" is not a class.
CLASSES = (
    ("Bird", (165, 42, 42)), ("Ground Animal", (0, 192, 0)), ("Curb", (196, 196, 196)),
    ("Fence", (190, 153, 153)), ("Guard Rail", (180, 165, 180)), ("Barrier", (90, 120, 150)),
    ("Wall", (102, 102, 156)), ("Bike Lane", (128, 64, 255)), ("Crosswalk - Plain", (140, 140, 200)),
    ("Curb Cut", (170, 170, 170)), ("Parking", (250, 170, 160)), ("Pedestrian Area", (96, 96, 96)),
    ("Rail Track", (230, 150, 140)), ("Road", (128, 64, 128)), ("Service Lane", (110, 110, 110)),
    ("Sidewalk", (244, 35, 232)), ("Bridge", (150, 100, 100)), ("Building", (70, 70, 70)),
    ("Tunnel", (150, 120, 90)), ("Person", (220, 20, 60)), ("Bicyclist", (255, 0, 0)),
    ("Motorcyclist", (255, 0, 100)), ("Other Rider", (255, 0, 200)), ("Lane Marking - Crosswalk", (200, 128, 128)),
    ("Lane Marking - General", (255, 255, 255)), ("Mountain", (64, 170, 64)), ("Sand", (230, 160, 50)),
    ("Sky", (70, 130, 180)), ("Snow", (190, 255, 255)), ("Terrain", (152, 251, 152)),
    ("Vegetation", (107, 142, 35)), ("Water", (0, 170, 30)), ("Banner", (255, 255, 128)),
    ("Bench", (250, 0, 30)), ("Bike Rack", (100, 140, 180)), ("Billboard", (220, 220, 220)),
    ("Catch Basin", (220, 128, 128)), ("CCTV Camera", (222, 40, 40)), ("Fire Hydrant", (100, 170, 30)),
    ("Junction Box", (40, 40, 40)), ("Mailbox", (33, 33, 33)), ("Manhole", (100, 128, 160)),
    ("Phone Booth", (142, 0, 0)), ("Pothole", (70, 100, 150)), ("Street Light", (210, 170, 100)),
    ("Pole", (153, 153, 153)), ("Traffic Sign Frame", (128, 128, 128)), ("Utility Pole", (0, 0, 80)),
    ("Traffic Light", (250, 170, 30)), ("Traffic Sign (Back)", (192, 192, 192)),
    ("Traffic Sign (Front)", (220, 220, 0)), ("Trash Can", (140, 140, 20)), ("Bicycle", (119, 11, 32)),
    ("Boat", (150, 0, 255)), ("Bus", (0, 60, 100)), ("Car", (0, 0, 142)), ("Caravan", (0, 0, 90)),
    ("Motorcycle", (0, 0, 230)), ("On Rails", (0, 80, 100)), ("Other Vehicle", (128, 64, 64)),
    ("Trailer", (0, 0, 110)), ("Truck", (0, 0, 70)), ("Wheeled Slow", (0, 0, 192)), ("Car Mount", (32, 32, 32)),
    ("Ego Vehicle", (120, 10, 10)),
)


def label_mapping():
    """``{v1.2 id: train id}``: the 65 classes keep their id, "Unlabeled" (65) becomes 255."""
    mapping = {i: i for i in range(len(CLASSES))}
    mapping[UNLABELED_ID] = IGNORE_LABEL
    return mapping


def _root(root):
    return datasets_root() if root is None else os.fspath(root)


def _dataset_dir(root):
    return os.path.join(_root(root), FOLDER)


def source_label_dir(root, split):
    """The first of ``<split folder>/v1.2/labels``, ``<split folder>/labels`` that exists (else the first)."""
    split_dir = os.path.join(_dataset_dir(root), SPLITS[split])
    candidates = [os.path.join(split_dir, *d.split("/")) for d in LABEL_DIRS]
    return next((c for c in candidates if os.path.isdir(c)), candidates[0])


def _prepared_dir(root, prepared, split):
    base = prepared_root(root) if prepared is None else os.fspath(prepared)
    return os.path.join(base, FOLDER, split)


def prepare(root=None, output=None, splits=tuple(SPLITS), overwrite=False, log=print):
    """Write train-id copies of the label maps of ``splits`` under ``output`` (default: the prepared root).

    Returns ``{split: (written, skipped)}``.
    """
    lut = make_lut(label_mapping())
    done = {}
    for split in splits:
        src, dst = source_label_dir(root, split), _prepared_dir(root, output, split)
        done[split] = prepare_labels(src, ".png", dst, lut, overwrite, what=f"Mapillary Vistas {split}")
        log(f"mapillary_vistas {split}: {done[split][0]} written, {done[split][1]} already there -> {dst}")
    return done


def register_mapillary_vistas(root=None, prepared=None, prefix="mapillary_vistas_sem_seg"):
    """Register ``<prefix>_train`` and ``<prefix>_val`` (read lazily). ``root``: the datasets root (default
    ``$DETECTRON2_DATASETS``); ``prepared``: the prepared root. Returns the names."""
    names = []
    for split, folder in SPLITS.items():
        label_dir = _prepared_dir(root, prepared, split)
        hint = (
            "Its train-id label maps are converted copies of the v1.2 labels: run "
            f"`python datasets/prepare_sem_seg.py mapillary_vistas --root {_root(root)} "
            f"--output {os.path.dirname(os.path.dirname(label_dir))}`."
        )
        names.append(
            register_sem_seg_pairs(
                f"{prefix}_{split}",
                image_dir=os.path.join(_dataset_dir(root), folder, "images"),
                image_ext=".jpg",
                label_dir=label_dir,
                label_suffix=".png",
                metadata={
                    "stuff_classes": [c[0] for c in CLASSES],
                    "stuff_colors": [list(c[1]) for c in CLASSES],
                },
                labels_hint=hint,
            )
        )
    return names
