"""A DINOv2-style ViT (timm, never downloaded) with ViTDet's simple feature pyramid, as "build_vit_sfp_backbone".

The ViT sees the input padded to a multiple of its patch size (14 for DINOv2); timm's dynamic image size
interpolates the position embedding from MODEL.VIT.IMG_SIZE to the input. The last block's patch map,
normalised by the ViT's final norm, is resampled from stride 14 to stride 16, and Detectron2's
SimpleFeaturePyramid turns it into res2..res5 at strides 4, 8, 16, 32 (deconvolutions for 4x and 2x,
identity, max-pool for 0.5x, each followed by 1x1 and 3x3 convolutions with LayerNorm).

MODEL.VIT.WEIGHTS is a local file with timm names or the original DINOv2 names (``mask_token``,
``register_tokens``, SwiGLU ``w12``/``w3``, chunked ``blocks.{chunk}.{i}``), under any prefix
(``backbone.``, ``teacher.backbone.``, a whole Detectron2 model's ``backbone.net.vit.``).
"""
import logging
import math
import re

import timm
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid
from timm.models.vision_transformer import checkpoint_filter_fn

__all__ = [
    "DINOv2ViT",
    "ViTSimpleFeaturePyramid",
    "build_vit_sfp_backbone",
    "dinov2_to_timm",
    "load_vit_weights",
    "vit_state_from_checkpoint",
]

logger = logging.getLogger(__name__)

# The stride the patch map is resampled to; the pyramid's scales 4, 2, 1, 0.5 then give 4, 8, 16, 32.
MAP_STRIDE = 16
_PYRAMID_SCALES = {"res2": 4.0, "res3": 2.0, "res4": 1.0, "res5": 0.5}
_ANCHOR_KEY = "patch_embed.proj.weight"


def dinov2_to_timm(state):
    """Rename original DINOv2 keys to timm's (a new dict; timm-named input passes through unchanged)."""
    state = dict(state)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        # timm keeps register and class tokens outside the position embedding; DINOv2 adds pos[0] to cls.
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    out = {}
    for k, v in state.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block chunks hold global block indices
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    return out


def _unwrap(checkpoint):
    for name in ("model", "state_dict", "teacher"):
        if isinstance(checkpoint.get(name), dict) and not any(k.endswith(_ANCHOR_KEY) for k in checkpoint):
            checkpoint = checkpoint[name]
    return checkpoint


def vit_state_from_checkpoint(checkpoint, vit, source="checkpoint"):
    """The timm state dict for ``vit`` inside a loaded ``checkpoint`` (any prefix, timm or DINOv2 names),
    with the position embedding resampled to ``vit``'s grid."""
    state = _unwrap(checkpoint)
    prefixes = sorted({k[: -len(_ANCHOR_KEY)] for k in state if k.endswith(_ANCHOR_KEY)}, key=len)
    if not prefixes:
        raise KeyError(f"{source}: no ViT weights found (no key ending in {_ANCHOR_KEY!r})")
    if len(prefixes) > 1:
        # DINOv2 training checkpoints hold a student and a teacher; the teacher is the one released.
        teachers = [p for p in prefixes if "teacher" in p]
        if len(teachers) != 1:
            raise KeyError(f"{source}: several ViTs under prefixes {prefixes}; save the one wanted alone")
        prefixes = teachers
    prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return checkpoint_filter_fn(dinov2_to_timm(state), vit)


def load_vit_weights(vit, path):
    """Load a local weights file into a timm ViT; every parameter must be found, nothing left over."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"MODEL.VIT.WEIGHTS: no file {path}") from None
    state = vit_state_from_checkpoint(checkpoint, vit, source=f"MODEL.VIT.WEIGHTS {path}")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MODEL.VIT.WEIGHTS {path} does not fit the ViT: missing {missing}, unexpected {unexpected}")
    logger.info("Loaded ViT weights from %s (%d tensors)", path, len(state))


class DINOv2ViT(Backbone):
    """A timm ViT returning the last block's normalised patch map, resampled to stride 16, as "last_feat"."""

    def __init__(self, name="vit_base_patch14_dinov2", img_size=518, drop_path_rate=0.1, weights="",
                 freeze=False, in_chans=3):
        super().__init__()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*dinov2*")[:8]
            raise ValueError(f"MODEL.VIT.NAME={name!r} is not a timm architecture (DINOv2 ones: {close})")
        self.vit = timm.create_model(name, pretrained=False, img_size=img_size, dynamic_img_size=True,
                                     drop_path_rate=drop_path_rate, num_classes=0, in_chans=in_chans)
        self.patch_size = self.vit.patch_embed.patch_size[0]
        if weights:
            load_vit_weights(self.vit, weights)
        self.frozen = freeze
        if freeze:
            self.vit.requires_grad_(False)
            self.vit.eval()
        self._out_features = ["last_feat"]
        self._out_feature_channels = {"last_feat": self.vit.embed_dim}
        self._out_feature_strides = {"last_feat": MAP_STRIDE}

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.vit.eval()  # no drop-path on a frozen trunk
        return self

    def forward(self, x):
        h, w = x.shape[-2:]
        gh, gw = math.ceil(h / MAP_STRIDE), math.ceil(w / MAP_STRIDE)
        # Pad so the patches cover the whole stride-16 grid; the resampled map then needs only a crop.
        p = self.patch_size
        ph, pw = -(-gh * MAP_STRIDE // p) * p, -(-gw * MAP_STRIDE // p) * p
        x = F.pad(x, (0, pw - w, 0, ph - h))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feat = self.vit.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)[-1]
        if p != MAP_STRIDE:
            # With an explicit scale factor the sample positions are (i + 0.5) * 16 / p - 0.5 in token
            # units: cell centres land on the same image positions as the tokens they read.
            feat = F.interpolate(feat, scale_factor=p / MAP_STRIDE, mode="bilinear", align_corners=False,
                                 recompute_scale_factor=False)
        return {"last_feat": feat[:, :, :gh, :gw]}


class ViTSimpleFeaturePyramid(SimpleFeaturePyramid):
    """Detectron2's SimpleFeaturePyramid over :class:`DINOv2ViT`, with ResNet-style names res2..res5."""

    @configurable
    def __init__(self, *, net, out_channels=256, out_features=("res2", "res3", "res4", "res5"), norm="LN"):
        unknown = [f for f in out_features if f not in _PYRAMID_SCALES]
        if unknown:
            raise ValueError(f"MODEL.VIT.OUT_FEATURES has unknown names {unknown}; choose from {list(_PYRAMID_SCALES)}")
        names = [f for f in _PYRAMID_SCALES if f in out_features]
        if not names or len(names) != int(names[-1][3:]) - int(names[0][3:]) + 1:
            raise ValueError(f"MODEL.VIT.OUT_FEATURES {list(out_features)} must be consecutive levels of res2..res5")
        super().__init__(net, "last_feat", out_channels, [_PYRAMID_SCALES[f] for f in names], norm=norm)
        # SimpleFeaturePyramid names its outputs by _out_features, in stage order: rename them here.
        self._out_features = names
        self._out_feature_strides = {f: 2 ** int(f[3:]) for f in names}
        self._out_feature_channels = {f: out_channels for f in names}

    @classmethod
    def from_config(cls, cfg, input_shape):
        v = cfg.MODEL.VIT
        net = DINOv2ViT(v.NAME, v.IMG_SIZE, v.DROP_PATH_RATE, v.WEIGHTS, v.FREEZE, in_chans=input_shape.channels)
        return {"net": net, "out_channels": v.OUT_CHANNELS, "out_features": list(v.OUT_FEATURES)}

    @property
    def size_divisibility(self):
        return 32


@BACKBONE_REGISTRY.register()
def build_vit_sfp_backbone(cfg, input_shape):
    return ViTSimpleFeaturePyramid(cfg, input_shape)
