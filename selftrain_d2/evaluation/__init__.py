from .build import EVALUATOR_BUILDERS, build_evaluator, register_evaluator
from .cityscapes import MultiMachineCityscapesInstanceEvaluator, MultiMachineCityscapesSemSegEvaluator

__all__ = [
    "EVALUATOR_BUILDERS",
    "build_evaluator",
    "register_evaluator",
    "MultiMachineCityscapesInstanceEvaluator",
    "MultiMachineCityscapesSemSegEvaluator",
]
