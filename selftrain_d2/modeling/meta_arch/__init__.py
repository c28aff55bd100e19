"""Meta-architectures registered in Detectron2's META_ARCH_REGISTRY: "MaskFormer" (the reference's
name) and the task-fixed variants "Mask2FormerSemantic" / "Mask2FormerInstance"; "FastSCNN", the real-time
semantic student; "PSPNet", the knowledge-distillation teacher and students; "SoftSemanticSegmentor", Detectron2's
SemanticSegmentor that also trains on soft pseudo labels."""
from .fast_scnn import FastSCNN
from .mask_former import (
    Mask2FormerInstance,
    Mask2FormerSemantic,
    MaskFormer,
    build_mask_former_criterion,
    mask_former_weight_dict,
    semantic_targets,
)
from .pspnet import PSPNet, dilate_backbone
from .postprocess import instance_inference, masks_to_boxes, panoptic_inference, semantic_inference
from .soft_semantic import SoftSemanticSegmentor

__all__ = [
    "PSPNet",
    "dilate_backbone",
    "FastSCNN",
    "SoftSemanticSegmentor",
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
