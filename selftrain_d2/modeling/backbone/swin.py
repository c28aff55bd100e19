"""Swin Transformer as a Detectron2 backbone, registered as "D2SwinTransformer" and read from MODEL.SWIN.*.

Parameter and buffer names are those of the reference Mask2Former's D2SwinTransformer, so its Swin
checkpoints load unchanged: ``patch_embed.{proj,norm}``, ``layers.{i}.blocks.{j}.{norm1, attn.qkv,
attn.proj, attn.relative_position_bias_table, attn.relative_position_index, norm2, mlp.fc1, mlp.fc2}``,
``layers.{i}.downsample.{norm,reduction}`` and ``norm{i}`` for every stage. The maths follows it too:
feature maps are padded to the window size inside each block (so any input size works), shifted windows
are masked with -100, and the padded tokens take part in attention as they do there.

Sizes are config values: Swin-T EMBED_DIM 96, DEPTHS [2, 2, 6, 2], NUM_HEADS [3, 6, 12, 24];
Swin-S 96, [2, 2, 18, 2], [3, 6, 12, 24]; Swin-B 128, [2, 2, 18, 2], [4, 8, 16, 32];
Swin-L 192, [2, 2, 18, 2], [6, 12, 24, 48] (with WINDOW_SIZE 12 and PRETRAIN_IMG_SIZE 384 for the
ImageNet-22k models).
"""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.layers import DropPath
from torch import nn

__all__ = [
    "D2SwinTransformer",
    "relative_position_index",
    "shifted_window_mask",
    "window_merge",
    "window_partition",
]

# Masked-out logits get this value (not -inf), as in the reference, so outputs match it.
_MASK_VALUE = -100.0


def window_partition(x, window):
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * windows, window * window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows, window, h, w):
    """Inverse of :func:`window_partition`: (B * windows, window * window, C) -> (B, h, w, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window):
    """Index into the (2w-1)^2 bias table for every (query, key) pair of a w x w window: [w*w, w*w]."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N, each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(hp, wp, window, shift, device=None):
    """Additive attention mask for shifted windows on an (hp, wp) padded map: [windows, N, N].

    After the cyclic shift, a window may hold tokens from up to 3 x 3 regions that were not adjacent
    in the image; tokens of different regions must not attend to each other.
    """
    region = torch.zeros(1, hp, wp, 1, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, window).squeeze(-1)  # windows, N
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, _MASK_VALUE)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows, with a learned relative position bias."""

    def __init__(self, dim, window, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self):
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)  # heads, N, N

    def forward(self, x, mask=None):
        """x: (B * windows, N, C); mask: (windows, N, N) additive, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(bw // windows, windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """(Shifted) window attention + MLP, pre-norm, on a (B, H*W, C) token sequence."""

    def __init__(self, dim, num_heads, window=7, shift=0, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"Swin shift {shift} must lie in [0, window size {window})")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, h, w, shift_mask):
        b, length, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (-h) % self.window, (-w) % self.window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window), shift_mask if self.shift else None)
        x = window_merge(x, self.window, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, length, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the resolution: concatenate each 2 x 2 neighbourhood (4C), normalise, project to 2C."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # The order (top-left, bottom-left, top-right, bottom-right) fixes the meaning of reduction's inputs.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """Blocks alternating plain and shifted windows, then (except in the last stage) patch merging."""

    def __init__(self, dim, depth, num_heads, window, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                 drop_path, downsample, use_checkpoint=False):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, qkv_bias, qk_scale,
                      drop, attn_drop, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, h, w):
        """Returns (stage output, h, w, input of the next stage, its h, its w)."""
        hp, wp = -(-h // self.window) * self.window, -(-w // self.window) * self.window
        mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device).to(x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, h, w, mask, use_reentrant=False)
            else:
                x = block(x, h, w, mask)
        if self.downsample is None:
            return x, h, w, x, h, w
        return x, h, w, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution (input padded to a multiple of the patch size)."""

    def __init__(self, patch_size, in_chans, embed_dim, norm=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x):
        h, w = x.shape[-2:]
        x = self.proj(F.pad(x, (0, (-w) % self.patch_size, 0, (-h) % self.patch_size)))
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """Swin Transformer returning res2..res5 (strides 4..32, EMBED_DIM x 1, 2, 4, 8 channels)."""

    @configurable
    def __init__(self, *, in_chans=3, pretrain_img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.3, ape=False, patch_norm=True,
                 out_features=("res2", "res3", "res4", "res5"), use_checkpoint=False):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"MODEL.SWIN.DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} need 4 stages each")
        unknown = [f for f in out_features if f not in _STRIDES]
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES has unknown names {unknown}; choose from {list(_STRIDES)}")
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        self.ape = ape
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # deeper blocks drop more
        starts = [sum(depths[:i]) for i in range(len(depths) + 1)]
        self.layers = nn.ModuleList(
            SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale,
                      drop_rate, attn_drop_rate, rates[starts[i]:starts[i + 1]], downsample=i < len(depths) - 1,
                      use_checkpoint=use_checkpoint)
            for i in range(len(depths))
        )
        # Every stage has its output norm, whichever features are returned (the reference's key set).
        for i, channels in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self._out_features = [f for f in _STRIDES if f in out_features]
        self._out_feature_strides = {f: _STRIDES[f] for f in self._out_features}
        self._out_feature_channels = {f"res{i + 2}": c for i, c in enumerate(self.num_features)
                                      if f"res{i + 2}" in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape):
        s = cfg.MODEL.SWIN
        return {
            "in_chans": input_shape.channels,
            "pretrain_img_size": s.PRETRAIN_IMG_SIZE,
            "patch_size": s.PATCH_SIZE,
            "embed_dim": s.EMBED_DIM,
            "depths": list(s.DEPTHS),
            "num_heads": list(s.NUM_HEADS),
            "window_size": s.WINDOW_SIZE,
            "mlp_ratio": s.MLP_RATIO,
            "qkv_bias": s.QKV_BIAS,
            "qk_scale": s.QK_SCALE,
            "drop_rate": s.DROP_RATE,
            "attn_drop_rate": s.ATTN_DROP_RATE,
            "drop_path_rate": s.DROP_PATH_RATE,
            "ape": s.APE,
            "patch_norm": s.PATCH_NORM,
            "out_features": list(s.OUT_FEATURES),
            "use_checkpoint": s.USE_CHECKPOINT,
        }

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes (N, C, H, W) input, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outputs = {}
        for i, stage in enumerate(self.layers):
            out, oh, ow, x, h, w = stage(x, h, w)
            # Every norm runs, as in the reference, so no parameter is left without a gradient under DDP.
            out = getattr(self, f"norm{i}")(out)
            name = f"res{i + 2}"
            if name in self._out_features:
                outputs[name] = out.view(-1, oh, ow, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
        return outputs

    @property
    def size_divisibility(self):
        return 32
