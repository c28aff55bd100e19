"""COCO-format datasets from the config: ``DATASETS.COCO_INSTANCES`` and their semantic twins
(``DATASETS.SEM_SEG_FROM_COCO``), so one annotation set serves instance and semantic segmentation.

The semantic twin of a COCO dataset has the same images and ``image_id`` (a split file of one serves the
other) and label maps rasterised from the instance masks: class 0 is ``background`` (pixels no object
covers), class ``k + 1`` the COCO dataset's ``k``-th thing class (categories sorted by id, as Detectron2
orders them), 255 the crowd regions (``iscrowd: 1``) that no object covers. Where objects overlap, the
smaller one is drawn on top. The maps are written once, when the twin is first loaded, to ``LABEL_DIR`` (by
default ``<prepared root>/sem_seg_from_coco/<name>-<hash of the JSON path>``, see ``sem_seg_layout``), at
``<image path relative to the image root>.png``; they are rewritten when the JSON file changes (size or
modification time). The class list is read from the JSON when the twin is registered, and kept beside the
maps so later registrations skip reading a large file.
"""
import hashlib
import json
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from ...utils.io import atomic_write, atomic_write_json
from .checked_builtin import add_path_checks
from .register import expand_path, register_once, register_once_by
from .sem_seg_layout import IGNORE_LABEL, prepared_root

__all__ = [
    "BACKGROUND",
    "coco_categories",
    "load_sem_seg_from_coco",
    "rasterise_annotations",
    "register_coco_instances_once",
    "register_sem_seg_from_coco",
]

logger = logging.getLogger(__name__)

BACKGROUND = "background"
_MARKER = "sem_seg_from_coco.json"


def register_coco_instances_once(name, json_file, image_root):
    """Detectron2's ``register_coco_instances`` (evaluator "coco"; ``thing_classes`` are set when the dataset is
    loaded), once per process, behind the path check of :mod:`.checked_builtin`. Returns ``name``."""
    json_file, image_root = expand_path(json_file), expand_path(image_root)

    def register():
        register_coco_instances(name, {}, json_file, image_root)
        add_path_checks(name)

    register_once_by(name, ("coco_instances", json_file, image_root), register)
    return name


def _source_signature(json_file):
    st = os.stat(json_file)
    return {"json_file": json_file, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(label_dir):
    try:
        with open(os.path.join(label_dir, _MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def coco_categories(json_file, label_dir=None):
    """Thing class names of a COCO JSON file in Detectron2's order (categories sorted by id). Taken from the
    marker in ``label_dir`` when it was written for this very file (same size and modification time)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file {json_file} does not exist")
    signature = _source_signature(json_file)
    marker = _read_marker(label_dir) if label_dir else None
    if marker and marker.get("source") == signature and marker.get("thing_classes"):
        return list(marker["thing_classes"])
    with open(json_file) as f:
        try:
            categories = json.load(f).get("categories")
        except ValueError as e:
            raise ValueError(f"COCO annotation file {json_file} is not valid JSON: {e}") from None
    if not categories or not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
        raise ValueError(f"COCO annotation file {json_file} has no 'categories' list of {{id, name}} entries")
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def _annotation_mask(annotation, height, width, where):
    from detectron2.structures.masks import polygons_to_bitmask
    from pycocotools import mask as mask_util

    segm = annotation.get("segmentation")
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):
            segm = mask_util.frPyObjects(segm, height, width)
        mask = mask_util.decode(segm).astype(bool)
    elif isinstance(segm, list):
        mask = polygons_to_bitmask([np.asarray(p, dtype=np.float64) for p in segm], height, width)
    else:
        raise ValueError(f"{where}: an annotation has no 'segmentation' (polygons or RLE) to rasterise")
    if mask.shape != (height, width):
        raise ValueError(f"{where}: a mask of size {mask.shape} in an image of size {(height, width)}")
    return mask


def rasterise_annotations(annotations, height, width, where="<image>"):
    """A uint8 label map from Detectron2 annotation dicts (contiguous ``category_id``): 0 background,
    ``category_id + 1`` objects (the smaller on top where they overlap), 255 crowd regions left uncovered."""
    label = np.zeros((height, width), np.uint8)
    masks = [(a, _annotation_mask(a, height, width, where)) for a in annotations]
    for _, mask in (m for m in masks if m[0].get("iscrowd", 0)):
        label[mask] = IGNORE_LABEL
    objects = [m for m in masks if not m[0].get("iscrowd", 0)]
    for annotation, mask in sorted(objects, key=lambda m: -int(m[1].sum())):
        label[mask] = int(annotation["category_id"]) + 1
    return label


def _image_size(record):
    if "height" in record and "width" in record:
        return int(record["height"]), int(record["width"])
    with Image.open(record["file_name"]) as im:
        return im.height, im.width


def _label_relpath(file_name, image_root):
    rel = os.path.relpath(file_name, image_root) if image_root else os.path.basename(file_name)
    if rel.startswith(".."):
        rel = os.path.basename(file_name)
    return os.path.splitext(rel)[0] + ".png"


def load_sem_seg_from_coco(name, coco_name, label_dir, classes):
    """Records of ``coco_name`` with ``sem_seg_file_name`` (label maps written as needed, see the module
    docstring) instead of ``annotations``."""
    records = DatasetCatalog.get(coco_name)
    meta = MetadataCatalog.get(coco_name)
    things = meta.get("thing_classes", None)
    if things is not None and [BACKGROUND] + list(things) != list(classes):
        raise ValueError(
            f"Dataset {name!r}: {coco_name!r} now has the classes {list(things)}, but {name!r} was registered "
            f"with {list(classes[1:])} (the annotation file changed since): start the process again"
        )
    json_file = meta.get("json_file", None)
    signature = _source_signature(json_file) if json_file and os.path.isfile(json_file) else None
    marker = _read_marker(label_dir)
    reuse = signature is not None and marker is not None and marker.get("source") == signature
    image_root = meta.get("image_root", None)
    out, seen, written = [], {}, 0
    for record in records:
        rel = _label_relpath(record["file_name"], image_root)
        if rel in seen:
            raise ValueError(
                f"Dataset {name!r}: images {seen[rel]} and {record['file_name']} would share the label map {rel}"
            )
        seen[rel] = record["file_name"]
        path = os.path.join(label_dir, rel)
        if not (reuse and os.path.isfile(path)):
            height, width = _image_size(record)
            label = rasterise_annotations(record.get("annotations", []), height, width,
                                          f"dataset {coco_name!r}, image {record['file_name']}")
            with atomic_write(path, "wb") as f:
                Image.fromarray(label).save(f, format="PNG")
            written += 1
        out.append({k: v for k, v in record.items() if k != "annotations"} | {"sem_seg_file_name": path})
    if written:
        logger.info("Dataset %s: %d label maps rasterised from %s into %s", name, written, coco_name, label_dir)
    if signature is not None and not reuse:
        atomic_write_json(os.path.join(label_dir, _MARKER),
                          {"source": signature, "thing_classes": list(classes[1:]), "images": len(out)}, indent=2)
    return out


def _default_label_dir(name, json_file):
    digest = hashlib.sha256((json_file or name).encode("utf-8")).hexdigest()[:10]
    return os.path.join(prepared_root(), "sem_seg_from_coco", f"{name}-{digest}")


def register_sem_seg_from_coco(name, coco_name, label_dir=None):
    """Register ``name``, the semantic twin of the registered COCO dataset ``coco_name`` (module docstring).

    Its classes come from ``coco_name``'s ``thing_classes`` when set, else from its ``json_file`` (read now).
    Metadata: ``stuff_classes`` (``background`` first), ``ignore_label`` 255, ``evaluator_type`` "sem_seg",
    ``image_root``, ``sem_seg_root`` (the label folder), ``sem_seg_from_coco`` (``coco_name``). Returns ``name``.
    """
    if coco_name not in DatasetCatalog.list():
        raise KeyError(
            f"DATASETS.SEM_SEG_FROM_COCO {name!r}: COCO dataset {coco_name!r} is not registered. Register it first "
            "(DATASETS.COCO_INSTANCES, or check its spelling)."
        )
    coco_meta = MetadataCatalog.get(coco_name)
    json_file = coco_meta.get("json_file", None)
    label_dir = expand_path(label_dir) if label_dir else _default_label_dir(name, json_file)
    things = coco_meta.get("thing_classes", None)
    if things is None:
        if not json_file:
            raise ValueError(f"DATASETS.SEM_SEG_FROM_COCO {name!r}: {coco_name!r} has neither thing_classes nor a "
                             "json_file in its metadata, so its classes are unknown")
        things = coco_categories(json_file, label_dir)
    if BACKGROUND in things:
        raise ValueError(f"DATASETS.SEM_SEG_FROM_COCO {name!r}: {coco_name!r} has a thing class named "
                         f"{BACKGROUND!r}, which is the twin's class 0 (pixels no object covers)")
    classes = [BACKGROUND] + list(things)
    meta = dict(stuff_classes=classes, ignore_label=IGNORE_LABEL, evaluator_type="sem_seg",
                image_root=coco_meta.get("image_root", None), sem_seg_root=label_dir, sem_seg_from_coco=coco_name)
    meta = {k: v for k, v in meta.items() if v is not None}
    spec = ("sem_seg_from_coco", coco_name, label_dir)
    register_once([(name, spec, lambda: load_sem_seg_from_coco(name, coco_name, label_dir, classes), meta)])
    return name
