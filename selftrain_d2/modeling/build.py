"""``build_model``: Detectron2's, plus the memory layout chosen by ``MODEL.CHANNELS_LAST``."""
import torch
from detectron2.modeling import build_model as _d2_build_model

__all__ = ["build_model", "apply_memory_format"]


def apply_memory_format(model, cfg):
    """``model`` with its 4-D weights in channels-last layout when ``MODEL.CHANNELS_LAST`` is set (in place).
    A convolution with a channels-last weight gives a channels-last output, so the layout then runs
    through every convolution of the network without converting the input images."""
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model


def build_model(cfg):
    """The model of ``cfg.MODEL.META_ARCHITECTURE`` on ``MODEL.DEVICE``, in ``MODEL.CHANNELS_LAST``'s layout."""
    return apply_memory_format(_d2_build_model(cfg), cfg)
