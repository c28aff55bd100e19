"""Optimizers: the reference Mask2Former recipe (SGD / AdamW, backbone LR multiplier, norm and
embedding weight decay, full-model gradient clipping), driven by cfg.SOLVER."""
from .build import build_optimizer, build_param_groups, full_model_gradient_clipping
from .lr_scheduler import CropScheduleLR, build_lr_scheduler

__all__ = [
    "build_optimizer", "build_param_groups", "full_model_gradient_clipping", "CropScheduleLR", "build_lr_scheduler",
]
