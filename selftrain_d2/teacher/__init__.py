"""The teacher side of online distillation: EMA maths, the frozen-teacher wrapper, pseudo-label filters."""
from .ema import copy_weights_, ema_update_
from .filters import (
    PSEUDO_FILTER_REGISTRY,
    Candidates,
    PseudoLabeler,
    build_pseudo_filters,
    instance_pseudo_labels,
    register_pseudo_filter,
    semantic_pseudo_labels,
)
from .frozen import FrozenTeacher, build_frozen_teacher, load_teacher_config, load_teacher_weights, raw_predictions

__all__ = [
    "ema_update_", "copy_weights_", "FrozenTeacher", "build_frozen_teacher", "load_teacher_config", "load_teacher_weights",
    "raw_predictions", "PSEUDO_FILTER_REGISTRY", "Candidates",
    "PseudoLabeler", "build_pseudo_filters", "instance_pseudo_labels", "register_pseudo_filter",
    "semantic_pseudo_labels",
]
