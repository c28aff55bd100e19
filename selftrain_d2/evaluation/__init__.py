from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from .build import EVALUATOR_BUILDERS, build_evaluator, register_evaluator
from .cityscapes import MultiMachineCityscapesInstanceEvaluator, MultiMachineCityscapesSemSegEvaluator
from .coco import FastCOCOEvaluator
from .sem_seg import CheckedSemSegEvaluator

__all__ = [
    "EVALUATOR_BUILDERS",
    "build_evaluator",
    "CheckedSemSegEvaluator",
    "FastCOCOEvaluator",
    "register_evaluator",
    "MultiMachineCityscapesInstanceEvaluator",
    "MultiMachineCityscapesSemSegEvaluator",
]
