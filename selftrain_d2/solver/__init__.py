"""Optimizers: the reference Mask2Former recipe (SGD / AdamW, backbone LR multiplier, norm and
embedding weight decay, full-model gradient clipping), driven by cfg.SOLVER."""
from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from .build import build_gradient_clipper, build_optimizer, build_param_groups, clip_full_model_
from .lr_scheduler import CropScheduleLR, build_lr_scheduler

__all__ = [
    "build_optimizer", "build_gradient_clipper", "build_param_groups", "clip_full_model_", "CropScheduleLR",
    "build_lr_scheduler",
]
