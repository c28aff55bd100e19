"""Config keys of the optimizer and mixed precision."""
from ..config import register_config

__all__ = ["add_solver_config"]


@register_config
def add_solver_config(cfg):
    """SOLVER.* keys: optimizer choice, multipliers, AMP dtype."""
    # Mixed precision (Detectron2's SOLVER.AMP.ENABLED turns it on): "float16", with a GradScaler that skips
    # steps whose gradients overflow, or "bfloat16", float32's range without scaling (Ampere GPUs and later).
    cfg.SOLVER.AMP.DTYPE = "float16"

    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay of query / level embeddings
    # "SGD" or "ADAMW". SGD and a multiplier of 1 build exactly Detectron2's optimizer; the
    # Mask2Former configs ask for ADAMW and 0.1 explicitly (the reference's defaults).
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # backbone learning rate = BASE_LR x this
