"""Learning-rate schedules, including the one a crop-size schedule needs.

With a crop schedule, iterations differ in batch size, so the schedule's progress is counted in images
processed (not iterations), and each epoch's rate is scaled by its batch's factor (linear rule by default).
"""
import math

from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver.lr_scheduler import LRScheduler, _get_warmup_factor_at_iter

__all__ = ["CropScheduleLR", "decay_factor", "build_lr_scheduler"]


def decay_factor(name, progress, power=0.9, constant_ending=0.0):
    """The decay of a schedule at ``progress`` in [0, 1]: "WarmupPolyLR" (DeepLab's poly, with its constant
    ending) or "WarmupCosineLR" (half cosine to 0)."""
    progress = min(max(progress, 0.0), 1.0)
    if name == "WarmupPolyLR":
        value = math.pow(1.0 - progress, power)
        return constant_ending if constant_ending > 0 and value < constant_ending else value
    if name == "WarmupCosineLR":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"SOLVER.LR_SCHEDULER_NAME {name!r} is not supported with INPUT.CROP_SCHEDULE: use "
                     "WarmupPolyLR or WarmupCosineLR")


class CropScheduleLR(LRScheduler):
    """lr(i) = base_lr x warm-up(i) x decay(images before i / all images) x batch factor of i's epoch."""

    def __init__(self, optimizer, table, *, name="WarmupPolyLR", warmup_factor=0.001, warmup_iters=0,
                 warmup_method="linear", power=0.9, constant_ending=0.0, last_epoch=-1):
        self.table = table
        self.name = name
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        self.power = power
        self.constant_ending = constant_ending
        decay_factor(name, 0.0)  # unknown schedule names fail here, not at the first step
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration):
        warmup = _get_warmup_factor_at_iter(self.warmup_method, iteration, self.warmup_iters, self.warmup_factor)
        progress = self.table.images_seen(iteration) / self.table.total_images()
        decay = decay_factor(self.name, progress, self.power, self.constant_ending if warmup == 1.0 else 0.0)
        epoch = self.table.at_iter(iteration)
        return warmup * decay * epoch.lr_factor

    def state_dict(self):
        # The table is rebuilt from the config; checkpoints hold plain values only (weights_only loading).
        return {k: v for k, v in super().state_dict().items() if k != "table"}

    def get_lr(self):
        f = self.factor(self.last_epoch)
        return [base_lr * f for base_lr in self.base_lrs]

    def _compute_values(self):
        return self.get_lr()


def build_lr_scheduler(cfg, optimizer, table=None):
    """DeepLab's builder (WarmupPolyLR, or Detectron2's schedules), or CropScheduleLR over ``table``."""
    if table is None:
        return build_deeplab_lr_scheduler(cfg, optimizer)
    s = cfg.SOLVER
    return CropScheduleLR(
        optimizer, table, name=s.LR_SCHEDULER_NAME, warmup_factor=s.WARMUP_FACTOR, warmup_iters=s.WARMUP_ITERS,
        warmup_method=s.WARMUP_METHOD, power=s.POLY_LR_POWER, constant_ending=s.POLY_LR_CONSTANT_ENDING,
    )
