"""Dataset registration: the demo scenes, checked COCO / Cityscapes, image folders and label splits."""
from . import builtin  # noqa: F401  (registration on import)
from .register import register_from_cfg

__all__ = ["register_from_cfg"]
