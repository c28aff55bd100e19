"""Segmentation heads registered in Detectron2's SEM_SEG_HEADS_REGISTRY."""
from .. import pixel_decoder  # noqa: F401  (registers the pixel decoders MaskFormerHead builds by name)
from .deeplab import DeepLabV3PlusGlobalPoolHead
from .mask_former_head import MaskFormerHead, build_pixel_decoder

__all__ = ["DeepLabV3PlusGlobalPoolHead", "MaskFormerHead", "build_pixel_decoder"]
