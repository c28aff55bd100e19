"""DeepLabV3+ with image-level ASPP pooling over the whole feature map, whatever its size.

Detectron2's DeepLabV3PlusHead sizes the ASPP pooling kernel from INPUT.CROP.SIZE, so it only takes inputs
whose size is a multiple of the crop. Crop-size schedules train at several crops, and pseudo labelling runs at
several scales: this head pools globally instead (as the original DeepLab does). Its dilated ASPP convolutions
skip the kernel taps that only read padding on small maps (``selftrain_d2.modeling.dilated_conv``: same
values, less work at small crops). Same parameters and state-dict keys as Detectron2's head, so checkpoints
move between the two.
"""
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead

from ..dilated_conv import convert_dilated_convs

__all__ = ["DeepLabV3PlusGlobalPoolHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3PlusGlobalPoolHead(DeepLabV3PlusHead):
    @configurable
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert_dilated_convs(self.decoder)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["train_size"] = None  # no fixed pooling kernel: ASPP pools the whole map
        return ret
