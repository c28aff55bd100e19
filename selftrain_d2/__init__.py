"""selftrain-d2: label-efficient segmentation on Detectron2.

Importing the package registers every component (backbones, meta-architectures, mappers, datasets,
evaluators, trainers) with Detectron2's registries, and each subsystem's config keys (its config.py).
"""
from . import data, evaluation, modeling, solver  # noqa: F401  (registration on import, config keys too)
from . import distill  # noqa: F401,E402  (KD losses and the Distiller; after modeling)
from . import pseudo_labels  # noqa: F401,E402  (DATASETS.PSEUDO_LABEL_FOLDERS folders)
from . import engine  # noqa: F401,E402  (trainers, SEMISUP keys)
from .config import add_selftrain_config
from .version import __version__

__all__ = ["__version__", "add_selftrain_config"]
