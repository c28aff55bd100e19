from .build import EVALUATOR_BUILDERS, build_evaluator, register_evaluator
from .cityscapes import MultiMachineCityscapesInstanceEvaluator, MultiMachineCityscapesSemSegEvaluator
from .sem_seg import CheckedSemSegEvaluator

__all__ = [
    "EVALUATOR_BUILDERS",
    "build_evaluator",
    "CheckedSemSegEvaluator",
    "register_evaluator",
    "MultiMachineCityscapesInstanceEvaluator",
    "MultiMachineCityscapesSemSegEvaluator",
]
