"""Detectron2 registration of the demo splits under stable names.

For each domain (city, rural) and split (labeled, unlabeled, val) two datasets are registered:
``demo_<domain>_<split>_sem_seg`` and ``demo_<domain>_<split>_instance``. Registration is lazy: it
touches no files; the loader generates the data on first use (``ensure_demo_data``).

Unlabeled splits carry no labels in their dicts; their metadata points at the held-out labels
(``heldout_sem_seg_root`` / ``heldout_json_file``) for checking pseudo-label quality.
"""
import functools
import json
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .classes import DOMAIN_CLASSES, DOMAIN_THING_CLASSES, DOMAINS, IGNORE_LABEL, SPLITS, class_colors
from .store import demo_root, ensure_demo_data

__all__ = ["VARIANTS", "demo_dataset_name", "demo_dataset_names", "register_demo_datasets"]

VARIANTS = ("sem_seg", "instance")


def demo_dataset_name(domain, split, variant):
    return f"demo_{domain}_{split}_{variant}"


def demo_dataset_names():
    return [demo_dataset_name(d, s, v) for d in DOMAINS for s in SPLITS for v in VARIANTS]


def _split_dir(root, domain, split):
    return Path(root) / domain / split


def _list_images(root, domain, split):
    """Plain dicts (file_name, height, width, image_id) of one split, in index order."""
    split_dir = _split_dir(root, domain, split)
    with open(split_dir / "instances.json") as f:
        images = json.load(f)["images"]
    return [
        {
            "file_name": str(split_dir / "images" / img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
        }
        for img in images
    ]


def _load(root, domain, split, variant, name):
    ensure_demo_data(root)
    split_dir = _split_dir(root, domain, split)
    if variant == "instance" and split != "unlabeled":
        dicts = load_coco_json(str(split_dir / "instances.json"), str(split_dir / "images"), dataset_name=name)
        for d in dicts:
            d["image_id"] = str(d["image_id"])  # already the string id in the JSON; kept explicit
        return dicts
    dicts = _list_images(root, domain, split)
    if variant == "sem_seg" and split != "unlabeled":
        for d in dicts:
            d["sem_seg_file_name"] = str(split_dir / "sem_seg" / f"{d['image_id']}.png")
    return dicts


def _metadata(root, domain, split, variant):
    split_dir = _split_dir(root, domain, split)
    labeled = split != "unlabeled"
    meta = {"demo_root": str(root), "domain": domain, "split": split, "image_root": str(split_dir / "images")}
    if variant == "sem_seg":
        classes = list(DOMAIN_CLASSES[domain])
        meta.update(stuff_classes=classes, stuff_colors=class_colors(classes), ignore_label=IGNORE_LABEL,
                    evaluator_type="sem_seg")
        meta["sem_seg_root" if labeled else "heldout_sem_seg_root"] = str(split_dir / "sem_seg")
    else:
        things = list(DOMAIN_THING_CLASSES[domain])
        meta.update(thing_classes=things, thing_colors=class_colors(things),
                    thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(things))},
                    evaluator_type="coco")
        meta["json_file" if labeled else "heldout_json_file"] = str(split_dir / "instances.json")
    return meta


def register_demo_datasets(root=None):
    """Register every demo dataset for ``root`` (default: ``demo_root()``, read now). Idempotent: names
    already registered for the same root are left alone; those registered for another root (e.g. after
    ``$SELFTRAIN_DEMO_ROOT`` changed) are re-registered. Returns the registered names."""
    root = Path(root).expanduser().absolute() if root is not None else demo_root()
    names = []
    for domain in DOMAINS:
        for split in SPLITS:
            for variant in VARIANTS:
                name = demo_dataset_name(domain, split, variant)
                names.append(name)
                if name in DatasetCatalog.list():
                    old = MetadataCatalog.get(name).get("demo_root")
                    if old is None:
                        raise ValueError(f"dataset {name!r} is already registered, not as a selftrain-d2 demo set")
                    if old == str(root):
                        continue
                    DatasetCatalog.remove(name)
                    MetadataCatalog.remove(name)
                DatasetCatalog.register(name, functools.partial(_load, root, domain, split, variant, name))
                MetadataCatalog.get(name).set(**_metadata(root, domain, split, variant))
    return names

