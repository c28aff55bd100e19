from .build import EVALUATOR_BUILDERS, build_evaluator, register_evaluator

__all__ = ["EVALUATOR_BUILDERS", "build_evaluator", "register_evaluator"]
