"""MaskFormer / Mask2Former meta-architecture: backbone -> mask-classification head -> set loss.

Registered as "MaskFormer" (the reference's name, so its YAML configs and checkpoints load
unchanged: submodules ``backbone``, ``sem_seg_head``, ``criterion``), plus "Mask2FormerSemantic" and
"Mask2FormerInstance", which fix the test-time task so a config picks it by meta-architecture name.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn

from .postprocess import (
    crop_and_resize,
    instance_inference,
    instances_from_pairs,
    panoptic_inference,
    select_instance_pairs,
    semantic_inference,
)

__all__ = [
    "MaskFormer",
    "Mask2FormerSemantic",
    "Mask2FormerInstance",
    "build_mask_former_criterion",
    "mask_former_weight_dict",
    "semantic_targets",
]


def mask_former_weight_dict(class_weight, mask_weight, dice_weight, dec_layers, deep_supervision=True):
    """Loss name -> weight: the final layer's losses and, with deep supervision, one ``_{i}`` copy
    for each of the ``dec_layers - 1`` earlier predictions (the learnable queries count as one)."""
    final = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(final)
    if deep_supervision:
        for i in range(dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in final.items()})
    return weights


def build_mask_former_criterion(cfg, num_classes):
    """The reference's set criterion (Hungarian matching; CE, sigmoid-BCE and dice on sampled points)."""
    from ..criterion import SetCriterion
    from ..matcher import HungarianMatcher

    mf = cfg.MODEL.MASK_FORMER
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT, num_points=mf.TRAIN_NUM_POINTS
    )
    weight_dict = mask_former_weight_dict(
        mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.DEC_LAYERS, mf.DEEP_SUPERVISION
    )
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
    )


def semantic_targets(sem_seg, ignore_value):
    """``(labels [N], masks [N, H, W] bool)``: one mask per class present in a label map, ignore excluded."""
    labels = torch.unique(sem_seg)
    labels = labels[labels != ignore_value].long()
    return labels, sem_seg[None] == labels[:, None, None]


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Per-image inputs: ``image`` (CHW, 0-255, cfg.INPUT.FORMAT); for training ``instances`` with
    ``gt_classes`` and ``gt_masks`` (or a ``sem_seg`` label map, split into per-class masks here);
    for inference optional ``height`` / ``width`` of the output.

    Training returns the weighted losses. Inference returns, per image, ``sem_seg`` ([K, H, W]
    scores), ``instances`` and ``panoptic_seg`` as the ``*_on`` flags ask.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Tuple[float],
        pixel_std: Tuple[float],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        ignore_value: int = 255,
        boxes_from_masks: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.metadata = metadata
        self.size_divisibility = size_divisibility if size_divisibility >= 0 else backbone.size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.ignore_value = ignore_value
        self.boxes_from_masks = boxes_from_masks
        if not semantic_on and not sem_seg_postprocess_before_inference:
            raise ValueError(
                "instance / panoptic inference needs masks at the output size: set "
                "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE True"
            )
        if panoptic_on and (metadata is None or not hasattr(metadata, "thing_dataset_id_to_contiguous_id")):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON needs the thing classes: the metadata of DATASETS.TRAIN[0] "
                "has no thing_dataset_id_to_contiguous_id"
            )

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_mask_former_criterion(cfg, sem_seg_head.num_classes),
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "test_topk_per_image": mf.TEST.DETECTIONS_PER_IMAGE,
            "boxes_from_masks": mf.TEST.BOXES_FROM_MASKS,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def num_classes(self):
        return self.sem_seg_head.num_classes

    def preprocess_image(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        if self.training:
            losses = self.criterion(outputs, self.prepare_targets(batched_inputs, images))
            weights = self.criterion.weight_dict
            return {k: v * weights[k] for k, v in losses.items() if k in weights}
        return self.inference(outputs, batched_inputs, images)

    def prepare_targets(self, batched_inputs, images):
        """Per image ``{"labels": [N], "masks": [N, Hpad, Wpad]}``, masks zero-padded to the batch size."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            if "instances" in x:
                inst = x["instances"].to(self.device)
                labels = inst.gt_classes
                masks = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
            elif "sem_seg" in x:
                labels, masks = semantic_targets(x["sem_seg"].to(self.device), self.ignore_value)
            else:
                raise KeyError(
                    "MaskFormer training inputs need 'instances' (gt_classes, gt_masks) or 'sem_seg'; use a "
                    "mask_former_* dataset mapper (INPUT.DATASET_MAPPER_NAME)"
                )
            padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": labels, "masks": padded})
        return targets

    def inference(self, outputs, batched_inputs, images):
        if self.instance_on and not (self.semantic_on or self.panoptic_on) and self.sem_seg_postprocess_before_inference:
            return self.instance_only_inference(outputs, batched_inputs, images)
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        thing_classes = None
        if self.panoptic_on:
            thing_classes = set(self.metadata.thing_dataset_id_to_contiguous_id.values())
        results = []
        for mask_cls, mask_pred, x, image_size in zip(
            outputs["pred_logits"], mask_pred_results, batched_inputs, images.image_sizes
        ):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            result = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = retry_if_cuda_oom(sem_seg_postprocess)(mask_pred, image_size, height, width)
                mask_cls = mask_cls.to(mask_pred)
            if self.semantic_on:
                r = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred)
                if not self.sem_seg_postprocess_before_inference:
                    r = retry_if_cuda_oom(sem_seg_postprocess)(r, image_size, height, width)
                result["sem_seg"] = r
            if self.panoptic_on:
                result["panoptic_seg"] = retry_if_cuda_oom(panoptic_inference)(
                    mask_cls, mask_pred, self.num_classes, self.object_mask_threshold, self.overlap_threshold,
                    thing_classes,
                )
            if self.instance_on:
                result["instances"] = retry_if_cuda_oom(instance_inference)(
                    mask_cls, mask_pred, self.num_classes, self.test_topk_per_image,
                    keep_classes=thing_classes, boxes_from_masks=self.boxes_from_masks,
                )
            results.append(result)
        return results

    def instance_only_inference(self, outputs, batched_inputs, images):
        """Instances only: the same results as :meth:`inference`, but only the masks of the top-k pairs
        are upsampled, a few at a time (resizing is per mask, so the values are identical)."""
        results = []
        for mask_cls, mask_pred, x, image_size in zip(
            outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images.image_sizes
        ):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            scores, labels, query = select_instance_pairs(mask_cls, self.num_classes, self.test_topk_per_image)

            def resize(masks, image_size=image_size, height=height, width=width):
                padded = F.interpolate(masks[None], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
                return crop_and_resize(padded[0], image_size, height, width)

            instances = retry_if_cuda_oom(instances_from_pairs)(
                mask_pred, scores, labels, self.boxes_from_masks, rows=query, resize=resize, size=(height, width)
            )
            results.append({"instances": instances})
        return results


@META_ARCH_REGISTRY.register()
class Mask2FormerSemantic(MaskFormer):
    """MaskFormer predicting semantic segmentation only, whatever MODEL.MASK_FORMER.TEST says."""

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        args.update(
            semantic_on=True, instance_on=False, panoptic_on=False,
            sem_seg_postprocess_before_inference=cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
        )
        return args


@META_ARCH_REGISTRY.register()
class Mask2FormerInstance(MaskFormer):
    """MaskFormer predicting instances only, whatever MODEL.MASK_FORMER.TEST says."""

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        args.update(semantic_on=False, instance_on=True, panoptic_on=False, sem_seg_postprocess_before_inference=True)
        return args
