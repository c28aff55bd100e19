"""The one ``build_evaluator`` used by training, ``--eval-only`` and the recipes.

A dataset's ``MetadataCatalog`` entry names its ``evaluator_type``; each type maps to a builder
registered here, so a new dataset family adds a builder instead of a branch.
"""
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluators

from .cityscapes import MultiMachineCityscapesInstanceEvaluator, MultiMachineCityscapesSemSegEvaluator
from .coco import FastCOCOEvaluator
from .sem_seg import CheckedSemSegEvaluator

__all__ = ["EVALUATOR_BUILDERS", "register_evaluator", "build_evaluator"]

EVALUATOR_BUILDERS = {}


def register_evaluator(evaluator_type):
    """Decorator: ``fn(cfg, dataset_name, output_folder) -> DatasetEvaluator`` for ``evaluator_type``."""

    def deco(fn):
        if evaluator_type in EVALUATOR_BUILDERS:
            raise KeyError(f"an evaluator builder for {evaluator_type!r} is already registered")
        EVALUATOR_BUILDERS[evaluator_type] = fn
        return fn

    return deco


@register_evaluator("sem_seg")
def _sem_seg(cfg, dataset_name, output_folder):
    return CheckedSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder,
                                  invalid_labels=cfg.TEST.INVALID_LABEL_IDS)


@register_evaluator("coco")
def _coco(cfg, dataset_name, output_folder):
    # faster-coco-eval's compiled COCOeval (pycocotools' where it is missing), never detectron2._C's.
    return FastCOCOEvaluator(dataset_name, output_dir=output_folder)


@register_evaluator("cityscapes_instance")
def _cityscapes_instance(cfg, dataset_name, output_folder):
    return MultiMachineCityscapesInstanceEvaluator(dataset_name)


@register_evaluator("cityscapes_sem_seg")
def _cityscapes_sem_seg(cfg, dataset_name, output_folder):
    return MultiMachineCityscapesSemSegEvaluator(dataset_name)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """Evaluator(s) for ``dataset_name`` chosen by its metadata's ``evaluator_type`` (str or list)."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    types = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if types is None:
        raise KeyError(f"dataset {dataset_name!r} has no 'evaluator_type' in its MetadataCatalog entry")
    types = [types] if isinstance(types, str) else list(types)
    unknown = [t for t in types if t not in EVALUATOR_BUILDERS]
    if unknown:
        raise KeyError(
            f"dataset {dataset_name!r}: no evaluator registered for types {unknown}; known: {sorted(EVALUATOR_BUILDERS)}"
        )
    evaluators = [EVALUATOR_BUILDERS[t](cfg, dataset_name, output_folder) for t in types]
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
