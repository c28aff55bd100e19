"""Any timm convolutional architecture as a Detectron2 backbone (``build_timm_backbone``), e.g. the
EfficientNet-B0 student of the KD paper. timm supplies the architecture only; weights come from a local
file (``MODEL.TIMM.WEIGHTS``, timm key names) since nothing is downloaded at run time.

Levels are named like ResNet's (res2..res5 at strides 4..32, or less when ``MODEL.TIMM.OUTPUT_STRIDE``
makes timm dilate the deepest stages), so heads configured for ResNet take them unchanged.
"""
import os

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["TimmFeatureBackbone", "build_timm_backbone"]

_LEVELS = {"res1": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}


class TimmFeatureBackbone(Backbone):
    def __init__(self, name="efficientnet_b0", out_features=("res2", "res3", "res4", "res5"), weights="",
                 output_stride=32, drop_path_rate=0.0):
        super().__init__()
        import timm

        unknown = sorted(set(out_features) - set(_LEVELS))
        if unknown:
            raise ValueError(f"MODEL.TIMM.OUT_FEATURES has unknown names {unknown}; choose from {sorted(_LEVELS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MODEL.TIMM.OUTPUT_STRIDE={output_stride}: use 8, 16 or 32")
        model = timm.create_model(name, pretrained=False, features_only=True, output_stride=output_stride,
                                  drop_path_rate=drop_path_rate)
        # timm lists one level per stride 2, 4, ... 32 (before dilation): the i-th is res{i+1}.
        channels = model.feature_info.channels()
        by_level = {f"res{i + 1}": (i, min(2 ** (i + 1), output_stride), c) for i, c in enumerate(channels)}
        missing = [f for f in out_features if f not in by_level]
        if missing:
            raise ValueError(f"timm model {name!r} has no levels {missing}; it has {sorted(by_level)}")
        if weights:
            self._load(model, weights)
        self.body = model
        self._out_features = list(out_features)
        self._index = {f: by_level[f][0] for f in self._out_features}
        self._out_feature_strides = {f: by_level[f][1] for f in self._out_features}
        self._out_feature_channels = {f: by_level[f][2] for f in self._out_features}

    @staticmethod
    def _load(model, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL.TIMM.WEIGHTS: file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        own = model.state_dict()
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise RuntimeError(
                f"MODEL.TIMM.WEIGHTS {path} lacks {len(missing)} weights of the model, e.g. {missing[:5]}"
            )
        model.load_state_dict({k: state[k] for k in own})

    def forward(self, x):
        feats = self.body(x)
        return {f: feats[i] for f, i in self._index.items()}

    @property
    def size_divisibility(self):
        return max(self._out_feature_strides.values())

    def output_shape(self):
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape):
    c = cfg.MODEL.TIMM
    if input_shape.channels != 3:
        raise ValueError(f"timm backbones take 3-channel input, got MODEL.PIXEL_MEAN of {input_shape.channels}")
    return TimmFeatureBackbone(c.NAME, tuple(c.OUT_FEATURES), c.WEIGHTS, c.OUTPUT_STRIDE, c.DROP_PATH_RATE)
