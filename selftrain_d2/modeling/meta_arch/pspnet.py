"""PSPNet (Zhao et al., 2017) as the meta-architecture "PSPNet": the KD paper's teacher (ResNet-101) and
students (ResNet-18, EfficientNet-B0).

Dilated backbone (output stride ``MODEL.PSPNET.OUTPUT_STRIDE``, 8 by default) -> pyramid pooling module
(average pools to 1x1, 2x2, 3x3, 6x6, each a 1x1 conv to in/4 channels, upsampled and concatenated with the
input) -> 3x3 conv (the "psp" features) -> dropout -> 1x1 classifier (``classifier``: class scores at the
output stride) -> bilinear upsampling. An optional auxiliary head on res4 adds its cross entropy (weight 0.4)
in training.

Detectron2's ResNets dilate only res5, and not for ResNet-18/34; the EfficientNet-Lite backbone not at all.
:func:`dilate_backbone` therefore turns the strides of the later stages into dilation after the backbone is
built (for any backbone whose stages it can find), as torchvision's ``replace_stride_with_dilation`` does.
The timm backbone dilates itself (``MODEL.TIMM.OUTPUT_STRIDE``).

Detectron2's conventions: training returns ``{"loss_sem_seg", "loss_sem_seg_aux"}`` (cross entropy with
``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``), inference ``[{"sem_seg": C x H x W scores at the original size}]``
like ``SemanticSegmentor``.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ..backbone import timm_features  # noqa: F401  (registers build_timm_backbone)
from ..dense_loss import dense_cross_entropy, padded_soft_targets
from .dense import normalized_images, padded_targets, sem_seg_results

__all__ = ["PSPNet", "PyramidPoolingModule", "backbone_stages", "dilate_backbone", "dilate_stages"]


def dilate_stages(stages):
    """Turn the stride-2 convolutions of ``stages`` (a list of stages, each a list of blocks, in forward
    order) into stride 1 and dilate every later conv so receptive fields stay as they were: in each stage
    the first block's convs keep the dilation reached so far, later blocks get twice that. Convs with
    explicit "same" padding get their padding scaled; dynamically padded ones compute it themselves."""
    dilation = 1
    for blocks in stages:
        new_dilation = dilation * 2
        for i, block in enumerate(blocks):
            if isinstance(getattr(block, "stride", None), int):  # Detectron2's CNNBlockBase records its stride
                block.stride = 1
            for conv in block.modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                conv.stride = (1, 1)
                k = conv.kernel_size[0]
                if k == 1:
                    continue
                d = dilation if i == 0 else new_dilation
                old_same = tuple(conv.dilation[j] * (conv.kernel_size[j] - 1) // 2 for j in range(2))
                if tuple(conv.padding) == old_same and old_same != (0, 0):
                    conv.padding = tuple(d * (conv.kernel_size[j] - 1) // 2 for j in range(2))
                conv.dilation = (d, d)
        dilation = new_dilation


def backbone_stages(backbone):
    """``{stage name: [blocks]}`` of a Detectron2 ResNet or the EfficientNet-Lite backbone, in forward order."""
    if hasattr(backbone, "stage_names") and hasattr(backbone, "stages"):
        return {name: list(stage) for name, stage in zip(backbone.stage_names, backbone.stages)}
    if hasattr(backbone, "_block_stage") and hasattr(backbone, "blocks"):
        stages = {}
        for block, name in zip(backbone.blocks, backbone._block_stage):
            stages.setdefault(name, []).append(block)
        return stages
    raise TypeError(
        f"cannot dilate a {type(backbone).__name__}: PSPNet knows Detectron2's ResNets and EfficientNet-Lite; "
        "use a backbone with the output stride of MODEL.PSPNET.OUTPUT_STRIDE (e.g. MODEL.TIMM.OUTPUT_STRIDE)"
    )


def dilate_backbone(backbone, output_stride):
    """Dilate the stages of ``backbone`` whose stride exceeds ``output_stride`` (res4 and res5 for 8) and
    update its output strides."""
    base = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    stages = backbone_stages(backbone)
    todo = [name for name in ("res3", "res4", "res5") if name in stages and base[name] > output_stride]
    dilate_stages([stages[name] for name in todo])
    for name in list(backbone._out_feature_strides):
        backbone._out_feature_strides[name] = min(backbone._out_feature_strides[name], output_stride)
    return backbone


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling: per bin size b, average pool to b x b, 1x1 conv to in/len(bins) channels
    (norm, ReLU), upsample; concatenated with the input."""

    def __init__(self, in_channels, bins=(1, 2, 3, 6), norm="BN"):
        super().__init__()
        ch = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                Conv2d(in_channels, ch, 1, bias=not norm, norm=get_norm(norm, ch), activation=nn.ReLU(inplace=True)),
            )
            for b in bins
        )
        self.out_channels = in_channels + ch * len(bins)

    def forward(self, x):
        size = x.shape[-2:]
        return torch.cat(
            [x] + [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches], 1
        )


def _conv3x3(in_ch, out_ch, norm):
    return Conv2d(in_ch, out_ch, 3, padding=1, bias=not norm, norm=get_norm(norm, out_ch),
                  activation=nn.ReLU(inplace=True))


@META_ARCH_REGISTRY.register()
class PSPNet(nn.Module):
    accepts_soft_labels = True  # inputs' "sem_seg_soft_classes" / "sem_seg_soft_probs" (the semantic mapper's)

    @configurable
    def __init__(self, *, backbone, in_feature, num_classes, pixel_mean, pixel_std, ppm_bins=(1, 2, 3, 6),
                 head_channels=512, dropout=0.1, norm="BN", aux_feature="", aux_weight=0.4, aux_channels=256,
                 ignore_value=255, loss_weight=1.0, size_divisibility=8):
        super().__init__()
        shapes = backbone.output_shape()
        for key, feature in (("IN_FEATURE", in_feature), ("AUX_FEATURE", aux_feature)):
            if feature and feature not in shapes:
                raise ValueError(f"MODEL.PSPNET.{key}={feature!r}: the backbone gives {sorted(shapes)}")
        self.backbone = backbone
        self.in_feature, self.aux_feature = in_feature, aux_feature
        self.ppm = PyramidPoolingModule(shapes[in_feature].channels, tuple(ppm_bins), norm)
        self.psp = _conv3x3(self.ppm.out_channels, head_channels, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = Conv2d(head_channels, num_classes, 1)
        if aux_feature:
            self.aux_head = nn.Sequential(
                _conv3x3(shapes[aux_feature].channels, aux_channels, norm),
                nn.Dropout2d(dropout),
                Conv2d(aux_channels, num_classes, 1),
            )
        self.aux_weight, self.loss_weight = aux_weight, loss_weight
        self.num_classes, self.ignore_value, self.size_divisibility = num_classes, ignore_value, size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        p, head = cfg.MODEL.PSPNET, cfg.MODEL.SEM_SEG_HEAD
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        if p.IN_FEATURE not in shapes:
            raise ValueError(f"MODEL.PSPNET.IN_FEATURE={p.IN_FEATURE!r}: the backbone gives {sorted(shapes)}")
        if shapes[p.IN_FEATURE].stride > p.OUTPUT_STRIDE:
            dilate_backbone(backbone, p.OUTPUT_STRIDE)
        return {
            "backbone": backbone,
            "in_feature": p.IN_FEATURE,
            "num_classes": head.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "ppm_bins": tuple(p.PPM_BINS),
            "head_channels": p.HEAD_CHANNELS,
            "dropout": p.DROPOUT,
            "norm": p.NORM,
            "aux_feature": p.AUX_FEATURE,
            "aux_weight": p.AUX_WEIGHT,
            "aux_channels": p.AUX_CHANNELS,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
            "size_divisibility": p.SIZE_DIVISIBILITY,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def _loss(self, scores, targets, soft):
        if soft is None:
            return F.cross_entropy(scores, targets, ignore_index=self.ignore_value)
        return dense_cross_entropy(scores, targets, self.ignore_value, soft)

    def forward(self, batched_inputs):
        images = normalized_images(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)
        features = self.backbone(images.tensor)
        scores = self.classifier(self.dropout(self.psp(self.ppm(features[self.in_feature]))))
        scores = F.interpolate(scores, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            targets = padded_targets(batched_inputs, self.size_divisibility, self.ignore_value, "PSPNet", self.device)
            soft = padded_soft_targets(batched_inputs, self.size_divisibility, self.device)
            losses = {"loss_sem_seg": self._loss(scores, targets, soft) * self.loss_weight}
            if self.aux_feature:
                aux = self.aux_head(features[self.aux_feature])
                aux = F.interpolate(aux, size=targets.shape[-2:], mode="bilinear", align_corners=False)
                losses["loss_sem_seg_aux"] = self._loss(aux, targets, soft) * self.aux_weight
            return losses
        return sem_seg_results(scores, batched_inputs, images.image_sizes)
