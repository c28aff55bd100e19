"""Backbones registered in Detectron2's BACKBONE_REGISTRY (Detectron2's own ResNets stay available)."""
from .efficientnet_lite import EfficientNetLiteBackbone, build_efficientnet_lite_backbone

__all__ = ["EfficientNetLiteBackbone", "build_efficientnet_lite_backbone"]
