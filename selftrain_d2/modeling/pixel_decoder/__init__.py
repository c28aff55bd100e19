"""Pixel decoders, registered (like the reference's) in Detectron2's SEM_SEG_HEADS_REGISTRY and built by
MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME."""
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .msdeformattn import MSDeformAttnPixelDecoder

__all__ = ["MSDeformAttn", "MSDeformAttnPixelDecoder", "ms_deform_attn"]
