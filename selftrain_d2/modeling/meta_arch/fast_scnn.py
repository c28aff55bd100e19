"""Fast-SCNN (Poudel et al., 2019), the paper's real-time student, as the meta-architecture "FastSCNN".

Learning to downsample (conv, 2 depthwise-separable convs; stride 8) -> global feature extractor (inverted
residual bottlenecks to stride 32, pyramid pooling) -> feature fusion (the stride-32 features upsampled,
a depthwise conv dilated by the upsampling factor and a 1x1 conv, added to a 1x1 projection of the stride-8
features) -> classifier (2 depthwise-separable convs, a 1x1 conv to the classes) -> bilinear upsampling.
With the defaults and 19 classes it has about 1.1M parameters, as in the paper.

Detectron2's conventions: ``forward(batched_inputs)`` returns ``{"loss_sem_seg": ...}`` in training (cross
entropy with ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``, or DeepLab's hard pixel mining with
``LOSS_TYPE: "hard_pixel_mining"``) and ``[{"sem_seg": C x H x W logits at the input's original size}]`` at
inference, like ``SemanticSegmentor``. Every setting is a ``MODEL.FAST_SCNN`` key.
"""
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.projects.deeplab.loss import DeepLabCE
from torch import nn

from ..dense_loss import dense_cross_entropy, padded_soft_targets
from .dense import normalized_images, padded_targets, sem_seg_results

__all__ = ["FastSCNN", "Bottleneck", "DSConv", "PyramidPooling", "FeatureFusion"]


def _conv_bn(in_ch, out_ch, kernel, stride=1, groups=1, dilation=1, norm="BN", relu=True):
    return Conv2d(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=dilation * (kernel // 2),
        dilation=dilation,
        groups=groups,
        bias=not norm,
        norm=get_norm(norm, out_ch),
        activation=nn.ReLU(inplace=True) if relu else None,
    )


class DSConv(nn.Sequential):
    """Depthwise-separable convolution: 3x3 depthwise (stride ``stride``) and 1x1 pointwise, each BN + ReLU."""

    def __init__(self, in_ch, out_ch, stride=1, norm="BN"):
        super().__init__(
            _conv_bn(in_ch, in_ch, 3, stride, groups=in_ch, norm=norm),
            _conv_bn(in_ch, out_ch, 1, norm=norm),
        )


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise, linear 1x1 project; residual when shapes match."""

    def __init__(self, in_ch, out_ch, stride, expansion, norm="BN"):
        super().__init__()
        hidden = in_ch * expansion
        self.block = nn.Sequential(
            _conv_bn(in_ch, hidden, 1, norm=norm),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, norm=norm),
            _conv_bn(hidden, out_ch, 1, norm=norm, relu=False),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average pools to ``bins`` x ``bins``, 1x1 conv to in/len(bins) channels,
    upsampled and concatenated with the input, fused by a 1x1 conv."""

    def __init__(self, in_ch, out_ch, bins=(1, 2, 3, 6), norm="BN"):
        super().__init__()
        branch_ch = in_ch // len(bins)
        # No normalisation in the pooled branches: a 1x1 map of a single image has no batch statistics.
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), Conv2d(in_ch, branch_ch, 1, activation=nn.ReLU(inplace=True)))
            for b in bins
        )
        self.fuse = _conv_bn(in_ch + branch_ch * len(bins), out_ch, 1, norm=norm)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return self.fuse(torch.cat([x] + pooled, dim=1))


class FeatureFusion(nn.Module):
    """Adds the high-resolution features (1x1 conv) to the low-resolution ones upsampled by ``scale`` (depthwise
    3x3 dilated by ``scale``, then 1x1 conv); ReLU after the sum."""

    def __init__(self, high_ch, low_ch, out_ch, scale, norm="BN"):
        super().__init__()
        self.scale = scale
        self.low_dw = _conv_bn(low_ch, low_ch, 3, groups=low_ch, dilation=scale, norm=norm)
        self.low_proj = _conv_bn(low_ch, out_ch, 1, norm=norm, relu=False)
        self.high_proj = _conv_bn(high_ch, out_ch, 1, norm=norm, relu=False)

    def forward(self, high, low):
        low = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.high_proj(high) + self.low_proj(self.low_dw(low)))


@META_ARCH_REGISTRY.register()
class FastSCNN(nn.Module):
    accepts_soft_labels = True  # inputs' "sem_seg_soft_classes" / "sem_seg_soft_probs" (the semantic mapper's)

    @configurable
    def __init__(
        self,
        *,
        num_classes,
        pixel_mean,
        pixel_std,
        downsample_channels=(32, 48, 64),
        bottleneck_channels=(64, 96, 128),
        bottleneck_repeats=(3, 3, 3),
        bottleneck_strides=(2, 2, 1),
        expansion=6,
        ppm_bins=(1, 2, 3, 6),
        fusion_channels=128,
        classifier_channels=128,
        dropout=0.1,
        norm="BN",
        size_divisibility=32,
        ignore_value=255,
        loss_type="cross_entropy",
        loss_top_k=0.2,
        loss_weight=1.0,
    ):
        super().__init__()
        if len(downsample_channels) != 3:
            raise ValueError(f"MODEL.FAST_SCNN.DOWNSAMPLE_CHANNELS must have 3 entries, got {downsample_channels}")
        if not len(bottleneck_channels) == len(bottleneck_repeats) == len(bottleneck_strides):
            raise ValueError(
                "MODEL.FAST_SCNN.BOTTLENECK_CHANNELS, BOTTLENECK_REPEATS and BOTTLENECK_STRIDES need the same "
                f"length, got {bottleneck_channels}, {bottleneck_repeats}, {bottleneck_strides}"
            )
        if loss_type not in ("cross_entropy", "hard_pixel_mining"):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}: FastSCNN knows cross_entropy, hard_pixel_mining"
            )
        c1, c2, c3 = downsample_channels
        self.learning_to_downsample = nn.Sequential(
            _conv_bn(3, c1, 3, stride=2, norm=norm), DSConv(c1, c2, 2, norm), DSConv(c2, c3, 2, norm)
        )
        blocks, in_ch = [], c3
        for out_ch, repeats, stride in zip(bottleneck_channels, bottleneck_repeats, bottleneck_strides):
            for i in range(repeats):
                blocks.append(Bottleneck(in_ch, out_ch, stride if i == 0 else 1, expansion, norm))
                in_ch = out_ch
        blocks.append(PyramidPooling(in_ch, in_ch, tuple(ppm_bins), norm))
        self.global_feature_extractor = nn.Sequential(*blocks)
        scale = math.prod(bottleneck_strides)
        self.feature_fusion = FeatureFusion(c3, in_ch, fusion_channels, scale, norm)
        self.classifier = nn.Sequential(
            DSConv(fusion_channels, classifier_channels, 1, norm),
            DSConv(classifier_channels, classifier_channels, 1, norm),
            nn.Dropout(dropout),
            Conv2d(classifier_channels, num_classes, 1),
        )
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        if loss_type == "hard_pixel_mining":
            self.loss = DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=loss_top_k)
        else:
            self.loss = nn.CrossEntropyLoss(ignore_index=ignore_value)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        fs, head = cfg.MODEL.FAST_SCNN, cfg.MODEL.SEM_SEG_HEAD
        return {
            "num_classes": head.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "downsample_channels": tuple(fs.DOWNSAMPLE_CHANNELS),
            "bottleneck_channels": tuple(fs.BOTTLENECK_CHANNELS),
            "bottleneck_repeats": tuple(fs.BOTTLENECK_REPEATS),
            "bottleneck_strides": tuple(fs.BOTTLENECK_STRIDES),
            "expansion": fs.EXPANSION,
            "ppm_bins": tuple(fs.PPM_BINS),
            "fusion_channels": fs.FUSION_CHANNELS,
            "classifier_channels": fs.CLASSIFIER_CHANNELS,
            "dropout": fs.DROPOUT,
            "norm": fs.NORM,
            "size_divisibility": fs.SIZE_DIVISIBILITY,
            "ignore_value": head.IGNORE_VALUE,
            "loss_type": head.LOSS_TYPE,
            "loss_top_k": fs.LOSS_TOP_K,
            "loss_weight": head.LOSS_WEIGHT,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def logits(self, images):
        """``N x C x H x W`` class scores at the resolution of the (padded) normalised ``images``."""
        high = self.learning_to_downsample(images)
        low = self.global_feature_extractor(high)
        scores = self.classifier(self.feature_fusion(high, low))
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, batched_inputs):
        images = normalized_images(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)
        scores = self.logits(images.tensor)
        if self.training:
            targets = padded_targets(batched_inputs, self.size_divisibility, self.ignore_value, "FastSCNN", self.device)
            soft = padded_soft_targets(batched_inputs, self.size_divisibility, self.device)
            if soft is None:
                return {"loss_sem_seg": self.loss(scores, targets) * self.loss_weight}
            top_k = self.loss.top_k_percent_pixels if isinstance(self.loss, DeepLabCE) else None
            loss = dense_cross_entropy(scores, targets, self.ignore_value, soft, top_k)
            return {"loss_sem_seg": loss * self.loss_weight}
        return sem_seg_results(scores, batched_inputs, images.image_sizes)
