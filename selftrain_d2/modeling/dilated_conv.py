"""Dilated convolutions that skip the kernel taps which, on a small feature map, only ever read padding.

With stride 1 and "same" zero padding (``dilation * (k // 2)``), tap ``t`` of a k-tap kernel axis reads input
row ``i + t * dilation`` for output row ``i``. When ``|t| * dilation >= size`` that row lies in the padding for
every output, so the tap adds exact zeros: the convolution equals one with the kernel cut to its live taps and
the padding cut to match (DeepLab v3 notes the extreme case: a rate near the map size leaves a 1x1 filter).
The ASPP's dilations meet this on small maps, e.g. rates 4 and 6 on the 2x4 res5 map of a 64x128 crop, where
the full kernels made the ASPP cost about twice as much per pixel as at a full-size crop. Outputs and gradients are the
same (the cut taps' weight gradients stay exact zeros); parameters and state-dict keys are unchanged.
"""
import torch.nn.functional as F
from detectron2.layers import Conv2d

__all__ = ["live_taps", "padding_free_conv2d", "is_same_padded", "PaddingFreeConv2d", "convert_dilated_convs"]


def live_taps(size, kernel, dilation):
    """How many taps on each side of the centre can read the input of a map ``size`` long: the taps ``t``
    with ``|t| * dilation < size``, at most ``kernel // 2``."""
    return min(kernel // 2, (size - 1) // dilation)


def padding_free_conv2d(x, weight, bias, dilation, groups):
    """``F.conv2d(x, weight, bias, 1, dilation * (k // 2), dilation, groups)`` (odd k), computed with only the
    taps that can reach ``x``."""
    kh, kw = weight.shape[-2:]
    rh = live_taps(x.shape[-2], kh, dilation[0])
    rw = live_taps(x.shape[-1], kw, dilation[1])
    weight = weight[..., kh // 2 - rh:kh // 2 + rh + 1, kw // 2 - rw:kw // 2 + rw + 1]
    return F.conv2d(x, weight, bias, 1, (dilation[0] * rh, dilation[1] * rw), dilation, groups)


def is_same_padded(conv):
    """Whether ``conv`` has stride 1, odd kernels and zero padding of ``dilation * (kernel // 2)``."""
    k, p, d = conv.kernel_size, conv.padding, conv.dilation
    return (conv.stride == (1, 1) and conv.padding_mode == "zeros" and not isinstance(p, str)
            and all(ki % 2 == 1 and pi == di * (ki // 2) for ki, pi, di in zip(k, p, d)))


class PaddingFreeConv2d(Conv2d):
    """Detectron2's Conv2d (with its norm and activation) for stride 1 and same zero padding, running
    :func:`padding_free_conv2d`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_same_padded(self):
            raise ValueError(f"PaddingFreeConv2d needs stride 1, odd kernels and padding = dilation * (kernel // 2) "
                             f"with zero padding; got {self}")

    def forward(self, x):
        x = padding_free_conv2d(x, self.weight, self.bias, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def convert_dilated_convs(module):
    """Replace, in place, every Detectron2 Conv2d below ``module`` that is dilated, stride 1 and same-padded by
    a PaddingFreeConv2d holding the same parameters, norm and activation. Returns ``module``."""
    for name, child in module.named_children():
        if type(child) is Conv2d and max(child.dilation) > 1 and is_same_padded(child):
            new = PaddingFreeConv2d(child.in_channels, child.out_channels, child.kernel_size, padding=child.padding,
                                    dilation=child.dilation, groups=child.groups, bias=child.bias is not None,
                                    norm=child.norm, activation=child.activation,
                                    device=child.weight.device, dtype=child.weight.dtype)
            new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_dilated_convs(child)
    return module
