"""Guided distillation with at most K pseudo objects per image and a ramped unsupervised weight.

Added purely by registration (importing this package is enough):

- the pseudo-label filter "top_k_per_image" (PSEUDO_FILTER_REGISTRY), listed in SEMISUP.ONLINE_PSEUDO_LABELS.FILTERS;
- the hook :class:`UnsupWeightRamp`, which raises lambda_u linearly from 0 to SEMISUP.UNSUP_LOSS_WEIGHT over
  PROJECTS.RAMPED_GD.RAMP_ITERS iterations (a pure function of the iteration, so resuming is exact);
- the trainer "RampedGuidedDistillationTrainer" (TRAINER_REGISTRY), chosen with SELFTRAIN.TRAINER.
"""

from detectron2.engine import HookBase

from selftrain_d2.engine import TRAINER_REGISTRY, SemiSupervisedTrainer
from selftrain_d2.teacher import register_pseudo_filter

__all__ = ["top_k_per_image", "ramp_weight", "UnsupWeightRamp", "RampedGuidedDistillationTrainer"]


@register_pseudo_filter("top_k_per_image", from_config=lambda cfg: {"k": cfg.PROJECTS.RAMPED_GD.TOP_K})
def top_k_per_image(c, *, k):
    """Keep the ``k`` most confident candidates of the image."""
    if len(c) <= k:
        return c
    return c.select(c.scores.topk(k).indices.sort().values)


def ramp_weight(iteration, target, ramp_iters):
    """lambda_u at ``iteration``: ``target`` x min(1, (iteration + 1) / ramp_iters); ``ramp_iters`` <= 0: ``target``."""
    if ramp_iters <= 0:
        return float(target)
    return float(target) * min(1.0, (iteration + 1) / ramp_iters)


class UnsupWeightRamp(HookBase):
    def __init__(self, target, ramp_iters):
        self.target = target
        self.ramp_iters = ramp_iters

    def before_step(self):
        self.trainer.train_step.unsup_weight = ramp_weight(self.trainer.iter, self.target, self.ramp_iters)


@TRAINER_REGISTRY.register()
class RampedGuidedDistillationTrainer(SemiSupervisedTrainer):
    def build_hooks(self):
        hooks = super().build_hooks()
        ramp = UnsupWeightRamp(self.cfg.SEMISUP.UNSUP_LOSS_WEIGHT, self.cfg.PROJECTS.RAMPED_GD.RAMP_ITERS)
        return [ramp] + hooks
