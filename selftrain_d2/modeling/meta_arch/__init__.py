"""Meta-architectures registered in Detectron2's META_ARCH_REGISTRY: "MaskFormer" (the reference's
name) and the task-fixed variants "Mask2FormerSemantic" / "Mask2FormerInstance"."""
from .mask_former import (
    Mask2FormerInstance,
    Mask2FormerSemantic,
    MaskFormer,
    build_mask_former_criterion,
    mask_former_weight_dict,
    semantic_targets,
)
from .postprocess import instance_inference, masks_to_boxes, panoptic_inference, semantic_inference

__all__ = [
    "MaskFormer",
    "Mask2FormerSemantic",
    "Mask2FormerInstance",
    "build_mask_former_criterion",
    "mask_former_weight_dict",
    "semantic_targets",
    "semantic_inference",
    "instance_inference",
    "panoptic_inference",
    "masks_to_boxes",
]
