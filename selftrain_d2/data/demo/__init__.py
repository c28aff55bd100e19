"""Embedded demo data: deterministic synthetic street scenes in two domains, generated on first use.

Domain "city" (10 classes) and domain "rural" (the same 10 plus terrain and truck, dusk palette,
different layout), each with labeled / unlabeled / val splits of 128 x 256 images, semantic labels
(train ids, 255 = ignore) and COCO instance masks. See ``store`` for the disk layout, ``register`` for
the Detectron2 dataset names (``demo_<domain>_<split>_{sem_seg,instance}``).
"""
from .classes import (
    CITY_CLASSES,
    CITY_THING_CLASSES,
    DEFAULT_COUNTS,
    DEFAULT_SEED,
    DOMAIN_CLASSES,
    DOMAIN_THING_CLASSES,
    DOMAINS,
    GENERATOR_VERSION,
    IGNORE_LABEL,
    RURAL_CLASSES,
    RURAL_THING_CLASSES,
    SPLITS,
)
from .register import demo_dataset_name, demo_dataset_names, register_demo_datasets
from .store import demo_root, ensure_demo_data, generate_demo_data

__all__ = [
    "CITY_CLASSES",
    "CITY_THING_CLASSES",
    "DEFAULT_COUNTS",
    "DEFAULT_SEED",
    "DOMAIN_CLASSES",
    "DOMAIN_THING_CLASSES",
    "DOMAINS",
    "GENERATOR_VERSION",
    "IGNORE_LABEL",
    "RURAL_CLASSES",
    "RURAL_THING_CLASSES",
    "SPLITS",
    "demo_dataset_name",
    "demo_dataset_names",
    "demo_root",
    "ensure_demo_data",
    "generate_demo_data",
    "register_demo_datasets",
]
