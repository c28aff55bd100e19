"""selftrain-d2: label-efficient segmentation on Detectron2.

Importing the package registers every component (backbones, meta-architectures, mappers, datasets,
evaluators) with Detectron2's registries.
"""
from . import data, evaluation, modeling  # noqa: F401  (registration on import)
from . import distill  # noqa: F401,E402  (KD losses and the Distiller; after modeling)
from . import pseudo_labels  # noqa: F401,E402  (DATASETS.PSEUDO_LABELS folders)
from .config import add_selftrain_config
from .version import __version__

__all__ = ["__version__", "add_selftrain_config"]
