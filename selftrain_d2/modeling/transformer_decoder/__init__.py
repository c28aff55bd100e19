"""Transformer decoders of Mask2Former-style heads, chosen by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME."""
from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Transformer decoders of MaskFormerHead, called as ``cls(cfg, in_channels, mask_classification)``.
"""


def build_transformer_decoder(cfg, in_channels, mask_classification=True):
    """The decoder named by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME, reading ``in_channels``-wide features."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


# Imported after the registry exists: the module registers into it.
from .masked_attention_decoder import MultiScaleMaskedTransformerDecoder  # noqa: E402
from .position_encoding import PositionEmbeddingSine  # noqa: E402

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
    "PositionEmbeddingSine",
]
