"""Registrations made on import: the demo scenes, path checks on Detectron2's COCO / Cityscapes, and the
paper's other datasets in their public layouts (Mapillary Vistas, BDD100K, CamVid, KITTI, Pascal VOC 2012) under
``$DETECTRON2_DATASETS``, read now, as Detectron2 does. Nothing is read from disk until a dataset is loaded."""
from ..demo import register_demo_datasets
from .bdd100k import register_bdd100k
from .camvid import register_camvid
from .checked_builtin import add_path_checks_to_builtin
from .kitti import register_kitti
from .mapillary_vistas import register_mapillary_vistas
from .voc import register_voc_sem_seg

register_demo_datasets()
add_path_checks_to_builtin()
register_mapillary_vistas()
register_bdd100k()
register_camvid()
register_kitti()
register_voc_sem_seg()
