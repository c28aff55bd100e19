"""Mask2Former's transformer decoder: learned queries refined by masked cross-attention to three
pixel-decoder scales in turn, self-attention and an FFN, with class and mask predictions after every layer.

Sequences are batch-first ([B, L, C]) here; parameter names and shapes are the reference's, so its
checkpoints load unchanged.
"""
import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import nn

from . import TRANSFORMER_DECODER_REGISTRY
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "masked_attention_mask",
    "mask_predictions",
]


def mask_predictions(mask_embed, mask_features):
    """Per-query mask logits: [B, Q, C] x [B, C, H, W] -> [B, Q, H, W]."""
    return torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)


def masked_attention_mask(mask_logits, size, num_heads):
    """Where each query may not look in the next cross-attention: outside its predicted mask.

    mask_logits [B, Q, H, W] are resized (bilinear) to ``size`` = (h, w) of the attended scale. Returns
    a bool [B * num_heads, Q, h * w] (True = masked, the layout nn.MultiheadAttention takes), without
    gradient. A query whose mask is empty at that scale attends everywhere instead.
    """
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    masked = resized.sigmoid().flatten(2) < 0.5
    masked = masked & ~masked.all(-1, keepdim=True)
    b, q, hw = masked.shape
    return masked[:, None].expand(b, num_heads, q, hw).reshape(b * num_heads, q, hw)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt, attn_mask=None, key_padding_mask=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        x = self.self_attn(q, k, value=x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False)[0]
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt, memory, attn_mask=None, key_padding_mask=None, pos=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.multihead_attn(query=_with_pos(x, query_pos), key=_with_pos(memory, pos), value=memory,
                                attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.linear2(self.dropout(F.relu(self.linear1(x))))
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _with_pos(x, pos):
    return x if pos is None else x + pos


def _xavier_matrices(module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """``forward(x, mask_features, mask=None)``: x is the pixel decoder's three scales (coarse to fine,
    [B, in_channels, h, w]), mask_features [B, mask_dim, H, W]. Returns {"pred_logits": [B, Q, K+1],
    "pred_masks": [B, Q, H, W], "aux_outputs": the same for the query features before each layer}."""

    # Checkpoints record version 2 (the reference's current weight format), so the reference code
    # loads our checkpoints without trying to convert them.
    _version = 2

    @configurable
    def __init__(
        self,
        in_channels,
        mask_classification=True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: channels of the pixel decoder's scales.
            mask_classification: must be True (the class head is part of the model).
            num_classes: K; the class head predicts K + 1 (the last is "no object").
            dec_layers: number of decoder layers (the config's DEC_LAYERS - 1).
            enforce_input_project: a 1x1 conv on every scale even if in_channels == hidden_dim.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder needs mask_classification=True")
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        # The layers run without dropout, whatever MODEL.MASK_FORMER.DROPOUT says (as the reference).
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=0.0, normalize_before=pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)

        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
            else:
                proj = nn.Sequential()
            self.input_proj.append(proj)

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # DEC_LAYERS counts the prediction from the learned queries themselves as a layer.
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }

    def forward(self, x, mask_features, mask=None):
        # ``mask`` (image padding) is ignored, as in the reference: masking padding does not help.
        if len(x) != self.num_feature_levels:
            raise ValueError(f"MultiScaleMaskedTransformerDecoder expects {self.num_feature_levels} scales, got {len(x)}")
        sizes, srcs, poss = [], [], []
        for i, feat in enumerate(x):
            sizes.append(tuple(feat.shape[-2:]))
            poss.append(self.pe_layer(feat).flatten(2).transpose(1, 2))  # [B, hw, C]
            src = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            srcs.append(src.transpose(1, 2))

        batch = srcs[0].shape[0]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        output = self.query_feat.weight[None].expand(batch, -1, -1)

        logits, masks, attn_mask = self.forward_prediction_heads(output, mask_features, sizes[0])
        predictions = [(logits, masks)]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, srcs[level], attn_mask=attn_mask, pos=poss[level], query_pos=query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            logits, masks, attn_mask = self.forward_prediction_heads(output, mask_features, next_size)
            predictions.append((logits, masks))

        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
        }

    def forward_prediction_heads(self, output, mask_features, attn_mask_size):
        """Class logits, mask logits and the next layer's attention mask from the queries [B, Q, C]."""
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        masks = mask_predictions(self.mask_embed(decoded), mask_features)
        return logits, masks, masked_attention_mask(masks, attn_mask_size, self.num_heads)
