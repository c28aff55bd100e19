"""Backbones registered in Detectron2's BACKBONE_REGISTRY (Detectron2's own ResNets stay available)."""
from .efficientnet_lite import EfficientNetLiteBackbone, build_efficientnet_lite_backbone
from .swin import D2SwinTransformer
from .vit_sfp import DINOv2ViT, ViTSimpleFeaturePyramid, build_vit_sfp_backbone

__all__ = [
    "D2SwinTransformer",
    "DINOv2ViT",
    "EfficientNetLiteBackbone",
    "ViTSimpleFeaturePyramid",
    "build_efficientnet_lite_backbone",
    "build_vit_sfp_backbone",
]
