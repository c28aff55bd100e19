"""Registrations made on import: the demo scenes, and path checks on Detectron2's COCO / Cityscapes."""
from ..demo import register_demo_datasets
from .checked_builtin import add_path_checks_to_builtin

register_demo_datasets()
add_path_checks_to_builtin()
