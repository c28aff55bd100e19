"""Shared pieces of the public semantic-segmentation layouts (Mapillary Vistas, BDD100K, CamVid, KITTI).

Each of those datasets is a flat folder of images beside a flat folder of label PNGs with the same stem.
Detectron2's ``SemSegEvaluator`` reads ``sem_seg_file_name`` as it is, and the training mappers expect train
ids (``0..C-1``, 255 = ignore), so a dataset whose label ids need converting is registered on converted
copies: ``datasets/prepare_<name>.py`` writes them, atomically and resumably, under the *prepared root*,
never into the dataset's own folder:

    $SELFTRAIN_PREPARED_ROOT (default: <datasets root>/selftrain_d2_prepared)/<dataset>/<split>/<stem>.png

The datasets root is Detectron2's: ``$DETECTRON2_DATASETS``, default ``./datasets``.
"""
import functools
import os

import numpy as np
from PIL import Image

from ...utils.io import atomic_write
from ..image_io import LabelValueError
from .register import register_once

__all__ = [
    "ENV_PREPARED_ROOT",
    "IGNORE_LABEL",
    "cityscapes_train_classes",
    "convert_label_map",
    "datasets_root",
    "load_sem_seg_pairs",
    "make_lut",
    "prepare_labels",
    "prepared_root",
    "register_sem_seg_pairs",
]

ENV_PREPARED_ROOT = "SELFTRAIN_PREPARED_ROOT"
IGNORE_LABEL = 255
_README = "datasets/README.md (in the selftrain-d2 repository)"
_SHOWN = 3


def datasets_root():
    """Detectron2's dataset root, read now: ``$DETECTRON2_DATASETS`` or ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def prepared_root(root=None):
    """Where converted label maps go: ``$SELFTRAIN_PREPARED_ROOT``, else ``<root>/selftrain_d2_prepared``
    (``root`` defaults to :func:`datasets_root`)."""
    env = os.environ.get(ENV_PREPARED_ROOT)
    if env:
        return os.path.expanduser(env)
    return os.path.join(datasets_root() if root is None else os.fspath(root), "selftrain_d2_prepared")


def _root_note():
    value = os.environ.get("DETECTRON2_DATASETS")
    if value is None:
        return (
            "DETECTRON2_DATASETS is not set, so the dataset root is ./datasets relative to the current "
            f"directory ({os.getcwd()})"
        )
    return f"DETECTRON2_DATASETS={value!r}"


def cityscapes_train_classes():
    """``(names, colors)`` of the 19 Cityscapes train ids, from cityscapesscripts' label table."""
    from cityscapesscripts.helpers.labels import labels

    train = sorted((lb for lb in labels if 0 <= lb.trainId < IGNORE_LABEL), key=lambda lb: lb.trainId)
    return [lb.name for lb in train], [list(lb.color) for lb in train]


def make_lut(mapping, ignore_label=IGNORE_LABEL):
    """A 256-entry lookup table (int16) from ``{source id: train id}``; ids not in ``mapping`` map to -1,
    which :func:`convert_label_map` reports as an error. ``ignore_label`` always maps to itself."""
    lut = np.full(256, -1, np.int16)
    for src, dst in mapping.items():
        if not 0 <= int(src) < 256 or not 0 <= int(dst) < 256:
            raise ValueError(f"label mapping {src} -> {dst} is outside 0..255")
        lut[int(src)] = int(dst)
    lut[ignore_label] = ignore_label
    return lut


def convert_label_map(label, lut, path="<array>"):
    """``lut[label]`` as uint8; raises LabelValueError naming ``path`` and the ids ``lut`` does not know."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise LabelValueError(
            f"label map {path} has shape {label.shape}; expected a single-channel (or palette) PNG of ids"
        )
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise LabelValueError(f"label map {path} holds ids outside 0..255")
        label = label.astype(np.uint8)
    out = lut[label]
    bad = out < 0
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad]))
        raise LabelValueError(f"label map {path} holds ids {values[:10]} that the dataset's label table lacks")
    return out.astype(np.uint8)


def _list_stems(folder, suffix):
    """``{stem: file name}`` of the files in ``folder`` ending in ``suffix`` (not recursive)."""
    with os.scandir(folder) as entries:
        return {
            e.name[: -len(suffix)]: e.name
            for e in entries
            if e.is_file() and e.name.endswith(suffix) and not e.name.startswith(".")
        }


def _missing_folder(name, what, path, hint=None):
    where = "" if os.path.isabs(path) else f" (absolute: {os.path.abspath(path)})"
    extra = f" {hint}" if hint else ""
    return FileNotFoundError(
        f"Dataset {name!r}: the {what} {path}{where} does not exist.{extra}\n{_root_note()}; the root is "
        f"fixed when selftrain_d2 is imported. See {_README} for the expected layout."
    )


def load_sem_seg_pairs(name, image_dir, image_ext, label_dir, label_suffix, labels_hint=None):
    """Records ``{file_name, sem_seg_file_name, image_id}`` pairing ``image_dir/<stem><image_ext>`` with
    ``label_dir/<stem><label_suffix>``, sorted by stem. Missing folders, an empty image folder and images
    without a label fail with the paths; ``labels_hint`` (e.g. the prepare command) is added to label errors.
    """
    if not os.path.isdir(image_dir):
        raise _missing_folder(name, "image folder", image_dir)
    if not os.path.isdir(label_dir):
        raise _missing_folder(name, "label folder", label_dir, labels_hint)
    images = _list_stems(image_dir, image_ext)
    if not images:
        raise FileNotFoundError(f"Dataset {name!r}: no *{image_ext} images in {image_dir}.")
    labels = _list_stems(label_dir, label_suffix)
    missing = sorted(set(images) - set(labels))
    if missing:
        shown = "".join(f"\n  {os.path.join(label_dir, s + label_suffix)}" for s in missing[:_SHOWN])
        more = f"\n  ... and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        extra = f"\n{labels_hint}" if labels_hint else ""
        raise FileNotFoundError(
            f"Dataset {name!r}: {len(missing)} of {len(images)} images in {image_dir} have no label map:"
            f"{shown}{more}{extra}"
        )
    return [
        {
            "file_name": os.path.join(image_dir, images[stem]),
            "sem_seg_file_name": os.path.join(label_dir, labels[stem]),
            "image_id": stem,
        }
        for stem in sorted(images)
    ]


def register_sem_seg_pairs(name, *, image_dir, image_ext, label_dir, label_suffix, metadata, labels_hint=None):
    """Register ``name`` lazily (nothing is read until it is loaded) with :func:`load_sem_seg_pairs`.

    Metadata: ``metadata`` plus ``image_root``, ``sem_seg_root``, ``ignore_label`` 255 and ``evaluator_type``
    "sem_seg". Registering the same arguments again does nothing. Returns ``name``.
    """
    image_dir, label_dir = os.fspath(image_dir), os.fspath(label_dir)
    meta = dict(metadata)
    meta.update(image_root=image_dir, sem_seg_root=label_dir, ignore_label=IGNORE_LABEL, evaluator_type="sem_seg")
    spec = ("sem_seg_pairs", image_dir, image_ext, label_dir, label_suffix)
    loader = functools.partial(load_sem_seg_pairs, name, image_dir, image_ext, label_dir, label_suffix, labels_hint)
    register_once([(name, spec, loader, meta)])
    return name


def _write_png(path, array):
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def prepare_labels(src_dir, src_suffix, out_dir, lut, overwrite=False, what="dataset"):
    """Convert every ``src_dir/<stem><src_suffix>`` through ``lut`` into ``out_dir/<stem>.png``.

    Each file is written atomically; files already in ``out_dir`` are skipped unless ``overwrite``, so an
    interrupted run resumes. Returns ``(written, skipped)``. The source folder is only read.
    """
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{what}: label folder {src_dir} does not exist.\n{_root_note()}. See {_README}.")
    stems = _list_stems(src_dir, src_suffix)
    if not stems:
        raise FileNotFoundError(f"{what}: no *{src_suffix} label maps in {src_dir}.")
    written = skipped = 0
    for stem in sorted(stems):
        dst = os.path.join(out_dir, stem + ".png")
        if not overwrite and os.path.exists(dst):
            skipped += 1
            continue
        src = os.path.join(src_dir, stems[stem])
        with Image.open(src) as im:
            label = np.array(im)  # palette PNGs give their indices, which are the ids
        _write_png(dst, convert_label_map(label, lut, src))
        written += 1
    return written, skipped
