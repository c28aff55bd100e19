"""A folder of images beside a folder of label maps as a semantic-segmentation dataset (``DATASETS.SEM_SEG``).

Images are found as in :mod:`.image_folder` (recursively, any of its extensions). The label map of
``IMAGE_DIR/<sub>/<stem>.<ext>`` is the PNG ``LABEL_DIR/<sub>/<base><suffix>.png`` for ``<base>`` the stem, or
the stem without a trailing ``_leftImg8bit`` (Cityscapes), and ``<suffix>`` one of :data:`LABEL_SUFFIXES`:

    x.jpg                        <->  x.png, x_label.png, x_mask.png, x_gt.png, x_train_id.png ...
    aachen_..._leftImg8bit.png   <->  aachen_..._gtFine_labelTrainIds.png

Exactly one candidate must exist: none, or two (``x.png`` and ``x_mask.png``), is an error naming the image.
The two folders may be one (``x.jpg`` beside ``x_mask.png``): PNGs that are another image's label are not
images. Label maps hold class ids ``0..len(CLASSES)-1`` and ``IGNORE_LABEL`` (default 255) for unlabelled
pixels. Records: ``file_name``, ``sem_seg_file_name``, and ``image_id`` = the image's path relative to
``IMAGE_DIR`` without its extension, as for image folders (so split files of one serve the other).
"""
import functools
import os

from .image_folder import find_images
from .register import expand_path, register_once
from .sem_seg_layout import IGNORE_LABEL

__all__ = ["LABEL_SUFFIXES", "label_candidates", "load_sem_seg_folder", "read_class_names", "register_sem_seg_folder"]

# Tried after the image's stem, in this order; the listed ones cover the common public layouts.
LABEL_SUFFIXES = (
    "",
    "_label",
    "_labels",
    "_mask",
    "_gt",
    "_train_id",
    "_trainIds",
    "_labelTrainIds",
    "_gtFine_labelTrainIds",
    "_gtCoarse_labelTrainIds",
)
_STEM_SUFFIXES = ("_leftImg8bit",)
_SHOWN = 3


def label_candidates(image_relpath):
    """The label paths (relative to the label folder, '/'-separated) that may hold an image's labels."""
    sub, name = os.path.split(image_relpath)
    stem = os.path.splitext(name)[0]
    bases = [stem] + [stem[: -len(s)] for s in _STEM_SUFFIXES if stem.endswith(s) and len(stem) > len(s)]
    out = []
    for base in bases:
        for suffix in LABEL_SUFFIXES:
            rel = f"{sub}/{base}{suffix}.png" if sub else f"{base}{suffix}.png"
            if rel not in out:
                out.append(rel)
    return out


def read_class_names(classes, where="CLASSES"):
    """Class names from a list, or from a text file of one name a line (blank lines and '#' lines skipped)."""
    if isinstance(classes, str):
        path = expand_path(classes)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: class file {classes} does not exist (absolute: {path})")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
        source = f"class file {path}"
    elif isinstance(classes, (list, tuple)):
        names = list(classes)
        source = "class list"
    else:
        raise ValueError(f"{where} must be a list of class names or a text file of one name a line, got {classes!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if not names or bad:
        raise ValueError(f"{where}: the {source} must hold non-empty names, got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: the {source} names {repeated} more than once")
    return names


def _list_labels(label_dir):
    found = set()
    for root, dirs, files in os.walk(label_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = os.path.relpath(root, label_dir)
        for f in files:
            if f.endswith(".png") and not f.startswith("."):
                found.add(f if rel_root == "." else os.path.join(rel_root, f).replace(os.sep, "/"))
    return found


def _listing(paths, folder):
    shown = "".join(f"\n  {os.path.join(folder, p)}" for p in paths[:_SHOWN])
    return shown + (f"\n  ... and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def load_sem_seg_folder(name, image_dir, label_dir):
    """Records pairing every image under ``image_dir`` with its label map under ``label_dir`` (module
    docstring); an image without a label, or with two candidates, fails with the paths and the rules."""
    if not os.path.isdir(label_dir):
        raise FileNotFoundError(f"Dataset {name!r}: the label folder {label_dir} does not exist.")
    images = find_images(image_dir)
    labels = _list_labels(label_dir)
    same_folder = os.path.realpath(image_dir) == os.path.realpath(label_dir)
    matched, missing, ambiguous = {}, [], []
    for rel in images:
        found = [c for c in label_candidates(rel) if c in labels and not (same_folder and c == rel)]
        if len(found) == 1:
            matched[rel] = found[0]
        elif found:
            ambiguous.append(f"{rel}: {' and '.join(found)}")
        else:
            missing.append(rel)
    used = set(matched.values()) if same_folder else set()
    missing = [m for m in missing if m not in used]
    rules = (
        f"A label map is LABEL_DIR/<same subfolder>/<stem><suffix>.png, <stem> the image's name without its "
        f"extension (and without {' or '.join(_STEM_SUFFIXES)}), <suffix> one of "
        f"{', '.join(repr(s) for s in LABEL_SUFFIXES)}."
    )
    if ambiguous:
        raise ValueError(
            f"Dataset {name!r}: {len(ambiguous)} images have more than one label map in {label_dir}:"
            + "".join(f"\n  {a}" for a in ambiguous[:_SHOWN])
            + f"\nKeep one per image. {rules}"
        )
    if missing:
        raise FileNotFoundError(
            f"Dataset {name!r}: {len(missing)} of {len(images)} images in {image_dir} have no label map in "
            f"{label_dir}:{_listing(missing, image_dir)}\n{rules}"
        )
    records = []
    for rel in images:
        if rel in used:
            continue
        records.append({
            "file_name": os.path.join(image_dir, *rel.split("/")),
            "sem_seg_file_name": os.path.join(label_dir, *matched[rel].split("/")),
            "image_id": os.path.splitext(rel)[0],
        })
    if not records:
        raise FileNotFoundError(f"Dataset {name!r}: {image_dir} holds no images besides label maps.")
    return records


def register_sem_seg_folder(name, image_dir, label_dir, classes, ignore_label=IGNORE_LABEL, where=None):
    """Register ``name``: the images under ``image_dir`` with their label maps under ``label_dir``.

    ``classes``: names in id order, or a text file of one name a line (read now). Nothing else is read until
    the dataset is loaded. Metadata: ``stuff_classes``, ``ignore_label``, ``evaluator_type`` "sem_seg",
    ``image_root``, ``sem_seg_root``. Returns ``name``.
    """
    where = where or f"dataset {name!r}"
    names = read_class_names(classes, f"{where}: CLASSES")
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int) or not 0 <= ignore_label <= 255:
        raise ValueError(f"{where}: IGNORE_LABEL must be an integer in 0..255, got {ignore_label!r}")
    if ignore_label < len(names):
        raise ValueError(
            f"{where}: IGNORE_LABEL {ignore_label} is one of the {len(names)} class ids (0..{len(names) - 1})"
        )
    image_dir, label_dir = expand_path(image_dir), expand_path(label_dir)
    meta = dict(stuff_classes=names, ignore_label=ignore_label, evaluator_type="sem_seg", image_root=image_dir,
                sem_seg_root=label_dir)
    spec = ("sem_seg_folder", image_dir, label_dir, tuple(names), ignore_label)
    register_once([(name, spec, functools.partial(load_sem_seg_folder, name, image_dir, label_dir), meta)])
    return name
