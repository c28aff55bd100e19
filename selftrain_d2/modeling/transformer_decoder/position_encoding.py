"""Sine positional encoding of 2-D feature maps (DETR's, as Mask2Former uses it)."""
import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_position_encoding"]


def sine_position_encoding(not_mask, num_pos_feats, temperature=10000, normalize=True, scale=2 * math.pi):
    """Encode every pixel by its (y, x) position among the valid pixels.

    not_mask: [B, H, W] bool, True on valid (non-padding) pixels.
    Returns [B, 2 * num_pos_feats, H, W] float32: num_pos_feats channels for y, then as many for x,
    each alternating sin (even channels) and cos (odd channels) of the position over a geometric
    range of wavelengths. With ``normalize`` positions are rescaled to (0, scale].
    """
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=not_mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)

    def encode(coord):
        phase = coord[..., None] / dim_t
        return torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((encode(y_embed), encode(x_embed)), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingSine(nn.Module):
    """``forward(x, mask=None)`` gives the encoding of x's [B, C, H, W] grid; ``mask`` ([B, H, W],
    True on padding) excludes padded pixels from the positions. Holds no parameters."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask=None):
        if mask is None:
            # Without padding every image has the same encoding: compute it once and broadcast.
            not_mask = torch.ones((1, x.shape[-2], x.shape[-1]), dtype=torch.bool, device=x.device)
            pos = sine_position_encoding(not_mask, self.num_pos_feats, self.temperature, self.normalize, self.scale)
            return pos.expand(x.shape[0], -1, -1, -1)
        return sine_position_encoding(~mask, self.num_pos_feats, self.temperature, self.normalize, self.scale)

    def extra_repr(self):
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}")
