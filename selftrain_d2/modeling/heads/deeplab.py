"""DeepLabV3+ with image-level ASPP pooling over the whole feature map, whatever its size.

Detectron2's DeepLabV3PlusHead sizes the ASPP pooling kernel from INPUT.CROP.SIZE, so it only takes inputs
whose size is a multiple of the crop. Crop-size schedules train at several crops, and pseudo labelling runs at
several scales: this head pools globally instead (as the original DeepLab does). Its dilated ASPP convolutions
skip the kernel taps that only read padding on small maps (``selftrain_d2.modeling.dilated_conv``: same
values, less work at small crops). Same parameters and state-dict keys as Detectron2's head, so checkpoints
move between the two. It also trains on soft pseudo labels (``SoftSemanticSegmentor`` passes them).
"""
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead
from detectron2.projects.deeplab.loss import DeepLabCE

from ..dense_loss import dense_cross_entropy
from ..dilated_conv import convert_dilated_convs

__all__ = ["DeepLabV3PlusGlobalPoolHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3PlusGlobalPoolHead(DeepLabV3PlusHead):
    accepts_soft_labels = True  # forward(features, targets, soft_targets)

    @configurable
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert_dilated_convs(self.decoder)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["train_size"] = None  # no fixed pooling kernel: ASPP pools the whole map
        return ret

    def forward(self, features, targets=None, soft_targets=None):
        if soft_targets is None or not self.training or self.decoder_only:
            return super().forward(features, targets)
        scores = F.interpolate(self.layers(features), scale_factor=self.common_stride, mode="bilinear",
                               align_corners=False)
        top_k = self.loss.top_k_percent_pixels if isinstance(self.loss, DeepLabCE) else None
        loss = dense_cross_entropy(scores, targets, self.ignore_value, soft_targets, top_k)
        return None, {"loss_sem_seg": loss * self.loss_weight}
