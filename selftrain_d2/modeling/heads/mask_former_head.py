"""Mask2Former's segmentation head: a pixel decoder and a transformer decoder ("predictor")."""
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..transformer_decoder import build_transformer_decoder

__all__ = ["MaskFormerHead", "build_pixel_decoder"]


def build_pixel_decoder(cfg, input_shape):
    """The pixel decoder named by MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME (looked up in SEM_SEG_HEADS_REGISTRY)."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} has no forward_features(); "
                         "it cannot be used as a MaskFormerHead pixel decoder")
    return model


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """``forward(features, mask=None)`` -> the predictor's dict ({"pred_logits", "pred_masks", "aux_outputs"})."""

    # Checkpoints record version 2 (the reference's current weight format), so the reference code
    # loads our checkpoints without trying to convert them.
    _version = 2

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str = "multi_scale_pixel_decoder",
    ):
        """
        Args:
            input_shape: the backbone features the head reads.
            num_classes: K, without the "no object" class.
            pixel_decoder: a module with ``forward_features(features) -> (mask_features, multi_scale_features)``.
            loss_weight, ignore_value: kept for the meta-architecture and losses.
            transformer_predictor: called as ``predictor(multi_scale_features, mask_features, mask)``.
            transformer_in_feature: what the predictor reads; only "multi_scale_pixel_decoder" is supported.
        """
        super().__init__()
        if transformer_in_feature != "multi_scale_pixel_decoder":
            raise ValueError(f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={transformer_in_feature!r}: "
                             "only 'multi_scale_pixel_decoder' (Mask2Former) is supported")
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.common_stride = 4
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_in_feature": in_feature,
            # The multi-scale pixel decoder's levels have CONVS_DIM channels.
            "transformer_predictor": build_transformer_decoder(cfg, head.CONVS_DIM, mask_classification=True),
        }

    def forward(self, features, mask=None):
        return self.layers(features, mask)

    def layers(self, features, mask=None):
        mask_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, mask)
