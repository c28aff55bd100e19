"""Regions of a mixed-precision forward that must run in float32."""
import contextlib

import torch

__all__ = ["autocast_off"]


def autocast_off(device):
    """A context turning autocast off on ``device`` (a torch.device or its type, e.g. "cuda"), for the parts of
    a forward that float16 cannot hold: sums over thousands of points or pixels, matching costs, softmaxes of
    distillation losses. Tensors made before it keep their dtype: cast them with ``.float()`` inside. A device
    without autocast (``meta``) has nothing to turn off."""
    device_type = device if isinstance(device, str) else torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
