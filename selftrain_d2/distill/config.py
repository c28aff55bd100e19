"""Config keys of knowledge distillation (the Distiller meta-architecture and its KD losses)."""
from detectron2.config import CfgNode as CN

from ..config import register_config
from .losses import KD_LOSS_REGISTRY

__all__ = ["add_distill_config"]


@register_config
def add_distill_config(cfg):
    """DISTILL.*: the teacher, the taps and each KD loss's settings."""
    d = cfg.DISTILL = CN()
    # Meta-architecture of the student (built from this config) when MODEL.META_ARCHITECTURE is "Distiller".
    d.STUDENT_META_ARCHITECTURE = "PSPNet"
    d.TEACHER = CN()
    d.TEACHER.CONFIG = ""  # the teacher's config file (any registered model)
    d.TEACHER.WEIGHTS = ""  # the teacher's checkpoint; never saved in the student's checkpoints
    d.LOSSES = ["pixel_kd"]  # KD losses by registered name (KD_LOSS_REGISTRY): pixel_kd, cwd, skd, ifvd, holistic ...
    # Named taps, [[NAME, STUDENT_MODULE, TEACHER_MODULE], ...]: forward hooks on those submodules (names as in
    # named_modules()). The defaults fit PSPNet: class scores before upsampling and the head's features.
    d.TAPS = [["logits", "classifier", "classifier"], ["features", "psp", "psp"]]
    d.RESIZE_TO = "student"  # tapped maps of different sizes are resized bilinearly to the "student"'s or "teacher"'s
    d.PROBE_SIZE = []  # (H, W) of the zero image that reads tap channels at build; [] = the absolute crop or 256x256
    # Each registered KD loss's settings, DISTILL.<NAME>, as the loss declares them (distill/losses.py).
    for name, loss in sorted(KD_LOSS_REGISTRY):
        d[name.upper()] = CN(dict(loss.config_defaults))
