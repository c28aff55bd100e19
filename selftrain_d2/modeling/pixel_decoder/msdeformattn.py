"""Mask2Former's pixel decoder: a deformable-attention encoder over the coarse levels, then an FPN
up to the mask stride.

Parameter names and shapes are the reference's (facebookresearch/Mask2Former), so its checkpoints load.
"""
from typing import Callable, Dict, List, Optional, Union

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ...utils.precision import autocast_off
from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .ms_deform_attn import MSDeformAttn, _int_pairs

__all__ = [
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
    "encoder_reference_points",
    "flatten_levels",
]

# The masked-attention transformer decoder always reads three scales.
NUM_DECODER_SCALES = 3


def flatten_levels(srcs, pos_embeds, level_embed):
    """Concatenate feature levels into one sequence.

    srcs, pos_embeds: lists of [B, C, H_l, W_l]; level_embed: [L, C], added to each level's positions.
    Returns src [B, S, C], pos [B, S, C], spatial_shapes [(H_l, W_l)] and level_start_index [L] as Python
    ints (the reference's are tensors, which every deformable layer would read back from the device).
    """
    spatial_shapes = [tuple(src.shape[-2:]) for src in srcs]
    sizes = [h * w for h, w in spatial_shapes]
    level_start_index = [sum(sizes[:lvl]) for lvl in range(len(sizes))]
    src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
    pos_flat = torch.cat([(pos.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1))
                          for lvl, pos in enumerate(pos_embeds)], 1)
    return src_flat, pos_flat, spatial_shapes, level_start_index


def encoder_reference_points(spatial_shapes, device, dtype=torch.float32):
    """Reference point of every pixel of every level: its centre, (x, y) in [0, 1] of its own map,
    used for all levels. Returns [1, S, L, 2]. (No padding masks: the reference never passes any,
    so its valid ratios are all 1.)"""
    points = []
    for h, w in _int_pairs(spatial_shapes):
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    points = torch.cat(points, 0)
    return points[None, :, None, :].expand(1, -1, len(spatial_shapes), -1)


def _at_least_float32(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention then a ReLU FFN, each with a residual and a post-LayerNorm."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, recompute=False):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, recompute=recompute)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, src, pos, spatial_shapes, level_start_index, padding_mask=None):
        reference_points = encoder_reference_points(spatial_shapes, src.device, src.dtype)
        reference_points = reference_points.expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Level embeddings + the deformable encoder over a list of feature maps."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 num_feature_levels=4, enc_n_points=4, recompute=False):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers, d_model=d_model, d_ffn=dim_feedforward, dropout=dropout,
            n_levels=num_feature_levels, n_heads=nhead, n_points=enc_n_points, recompute=recompute,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs, pos_embeds):
        """srcs, pos_embeds: lists of [B, C, H_l, W_l]. Returns memory [B, S, C], spatial_shapes,
        level_start_index (Python ints, see :func:`flatten_levels`)."""
        src, pos, spatial_shapes, level_start_index = flatten_levels(srcs, pos_embeds, self.level_embed)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index)
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """``forward_features(features)`` -> (mask_features [B, mask_dim, H/4, W/4], multi_scale_features:
    three [B, conv_dim, h, w] maps from coarse to fine, for the transformer decoder)."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = 4,
        transformer_recompute: bool = False,
    ):
        """
        Args:
            input_shape: the backbone features the decoder reads (channels and stride).
            transformer_*: deformable encoder settings; it runs on ``transformer_in_features``.
            conv_dim: channels of every decoder level; mask_dim: channels of the mask features.
            norm: normalization of the FPN convs (the encoder's input projections always use GroupNorm(32)).
            common_stride: stride of the mask features; FPN levels are added down to it.
            transformer_recompute: the deformable attention keeps only its inputs for backward and recomputes
                the sampling there (see ``ms_deform_attn``): less memory, the same gradients.
        """
        super().__init__()
        missing = set(transformer_in_features) - set(input_shape)
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES names {sorted(missing)}, "
                             f"which are not among the input features {sorted(input_shape)}")
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]
        self.feature_strides = [v.stride for _, v in by_stride]
        self.feature_channels = [v.channels for _, v in by_stride]
        enc_shapes = [(k, v) for k, v in by_stride if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in enc_shapes]
        self.transformer_feature_strides = [v.stride for _, v in enc_shapes]
        self.transformer_num_feature_levels = len(enc_shapes)

        # One projection per encoder level, coarsest first.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(v.channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for _, v in reversed(enc_shapes)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            recompute=transformer_recompute,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = NUM_DECODER_SCALES
        self.common_stride = common_stride
        self.num_fpn_levels = int(np.log2(min(self.transformer_feature_strides)) - np.log2(common_stride))

        # FPN levels finer than the encoder's, named adapter_i / layer_i from fine to coarse
        # (the reference's names); kept in coarse-to-fine order for the top-down pass.
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for idx, in_channels in enumerate(self.feature_channels[:self.num_fpn_levels]):
            lateral = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                            norm=get_norm(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            # Like the reference: the encoder's heads are MASK_FORMER.NHEADS and its FFN is 1024 wide
            # whatever DIM_FEEDFORWARD says (DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS is not read).
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "transformer_recompute": head.DEFORMABLE_ATTENTION_RECOMPUTE,
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(self, features):
        # The whole pixel decoder runs in (at least) float32, also under mixed precision, as the reference's.
        with autocast_off(next(iter(features.values())).device):
            return self._forward_features(features)

    def _forward_features(self, features):
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, reversed(self.transformer_in_features)):
            x = _at_least_float32(features[name])
            srcs.append(proj(x))
            pos.append(self.pe_layer(x))
        memory, spatial_shapes, level_start_index = self.transformer(srcs, pos)

        batch = memory.shape[0]
        sizes = [h * w for h, w in spatial_shapes]
        out = [z.transpose(1, 2).reshape(batch, -1, *src.shape[-2:]) for z, src in zip(memory.split(sizes, 1), srcs)]

        fpn_features = list(reversed(self.in_features[:self.num_fpn_levels]))
        for name, lateral, output in zip(fpn_features, self.lateral_convs, self.output_convs):
            lat = lateral(_at_least_float32(features[name]))
            up = F.interpolate(out[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
            out.append(output(lat + up))

        return self.mask_features(out[-1]), out[:self.maskformer_num_feature_levels]

    def forward(self, features):
        return self.forward_features(features)
