"""Frozen batch norm folded into the convolution before it, at every forward.

A FrozenBatchNorm2d after a convolution is a fixed per-channel scale and shift, so conv + norm is one
convolution with the weight scaled and a bias added. Computing that folded weight at each forward (a few
kilobytes) saves one or two passes over the activation in the forward and backward. The modules, their
parameters and buffers stay as they are, so state dicts and checkpoints are unchanged, and the weight and
the norm's buffers stay live: training, loading weights or editing the norm later all take effect.
"""
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d

__all__ = ["FrozenBNConv2d", "fold_frozen_batchnorm", "folded_conv_params"]


def folded_conv_params(weight, bias, norm):
    """(weight, bias) of the convolution equal to conv(weight, bias) followed by the frozen ``norm``."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype), shift.to(weight.dtype)


class FrozenBNConv2d(Conv2d):
    """Detectron2's Conv2d whose ``norm`` is a FrozenBatchNorm2d, run as one convolution."""

    def forward(self, x):
        if not isinstance(self.norm, FrozenBatchNorm2d):  # the norm was replaced after folding
            return super().forward(x)
        weight, bias = folded_conv_params(self.weight, self.bias, self.norm)
        x = F.conv2d(x, weight, bias.to(x.dtype), self.stride, self.padding, self.dilation, self.groups)
        return self.activation(x) if self.activation is not None else x


def fold_frozen_batchnorm(module):
    """Turn every detectron2 ``Conv2d`` under ``module`` whose norm is a FrozenBatchNorm2d into a
    :class:`FrozenBNConv2d` (in place; the same parameters and state-dict keys). Returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d):
            m.__class__ = FrozenBNConv2d
            count += 1
    return count
