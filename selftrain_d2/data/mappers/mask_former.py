"""Mappers for mask-classification models (MaskFormer / Mask2Former), under the reference's names.

Training outputs carry ``instances`` (``gt_classes`` int64 [N], ``gt_masks`` bool [N, H, W]) that
the model matches against its queries:

- "mask_former_semantic": label map -> one mask per class present (ignore excluded), plus ``sem_seg``;
- "mask_former_instance": COCO-style annotations (polygons or RLE) -> one mask per object;
- "coco_instance_lsj": the same targets with large-scale jitter (random scale, fixed-size crop).

At test time every mapper only resizes the image (``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) and drops
the labels: Detectron2's evaluators read the ground truth themselves.
"""
import copy
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import BitMasks, Instances

from ..image_io import read_image, read_sem_seg
from . import MAPPER_REGISTRY
from .semantic import CenteredAugInput, build_semantic_augmentations

__all__ = [
    "MaskFormerSemanticMapper",
    "MaskFormerInstanceMapper",
    "COCOInstanceLSJMapper",
    "pad_to_divisibility",
    "sem_seg_to_instances",
    "annotations_to_mask_instances",
    "MissingSegmentationError",
    "valid_region",
]

# Value of padded image pixels, as in the reference mappers (padded labels get the ignore id).
_IMAGE_PAD_VALUE = 128


def _flip(cfg):
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    return [T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical")]


def _with_color_aug(augs, cfg):
    """Insert SSD-style photometric distortion before the flip (the reference's order)."""
    if not cfg.INPUT.COLOR_AUG_SSD:
        return augs
    at = next((i for i, a in enumerate(augs) if isinstance(a, T.RandomFlip)), len(augs))
    return augs[:at] + [ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT)] + augs[at:]


def _test_augmentations(cfg):
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]


def _image_tensor(image):
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def pad_to_divisibility(image, size_divisibility, masks=None, sem_seg=None, ignore_label=255):
    """Pad a CHW image (value 128), ``[N, H, W]`` masks (0) and an HW label map (``ignore_label``)
    at the bottom / right up to the next multiple of ``size_divisibility`` (<= 0: unchanged)."""
    if size_divisibility <= 0:
        return image, masks, sem_seg
    h, w = image.shape[-2:]
    pad = [0, -w % size_divisibility, 0, -h % size_divisibility]
    if not any(pad):
        return image, masks, sem_seg
    image = F.pad(image, pad, value=_IMAGE_PAD_VALUE)
    if masks is not None:
        masks = F.pad(masks, pad, value=0)
    if sem_seg is not None:
        sem_seg = F.pad(sem_seg, pad, value=ignore_label)
    return image, masks, sem_seg


def sem_seg_to_instances(sem_seg, ignore_label):
    """Instances of ``sem_seg``'s size: one bool mask per class id present, ``ignore_label`` excluded."""
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_label]
    instances = Instances(tuple(sem_seg.shape))
    instances.gt_classes = classes.long()
    instances.gt_masks = sem_seg[None] == classes[:, None, None]
    return instances


def valid_region(transforms, source_shape):
    """Bool map of the pixels of the transformed image that come from the source (not padding)."""
    # Crops pad label maps with a value that differs between Detectron2 versions: anything but 1 is padding.
    return transforms.apply_segmentation(np.ones(source_shape, np.uint8)) == 1


class MissingSegmentationError(KeyError):
    """A non-crowd annotation without a mask, where a mask-classification model needs one."""

    def __str__(self):  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


def _maskless_annotations_in_json(record):
    """``(json_file, annotation ids)`` of the non-crowd annotations without a mask of ``record``'s image, looked up
    in the registered COCO datasets whose image_root holds the image (Detectron2's loader keeps neither)."""
    image, image_id = os.path.abspath(record.get("file_name", "")), record.get("image_id")
    for name in MetadataCatalog.list():
        meta = MetadataCatalog.get(name)
        json_file, root = meta.get("json_file", None), meta.get("image_root", None)
        if not (json_file and root and os.path.isfile(json_file)
                and image.startswith(os.path.join(os.path.abspath(root), ""))):
            continue
        try:
            with open(json_file) as f:
                annotations = json.load(f).get("annotations", [])
        except (OSError, ValueError, AttributeError):
            continue
        ids = [a.get("id") for a in annotations
               if a.get("image_id") == image_id and not a.get("iscrowd", 0) and not a.get("segmentation")]
        if ids:
            return json_file, ids
    return None, []


def _missing_segmentation(obj, index, record):
    where = "" if record is None else f"image {record.get('file_name')} (image_id {record.get('image_id')}): "
    what = f"annotation id {obj['id']}" if "id" in obj else f"annotation #{index}"
    if record is not None and "id" not in obj:
        json_file, ids = _maskless_annotations_in_json(record)
        if json_file:
            where = f"{json_file}, {where}"
            what += f" (ids without a mask in this image: {ids[:10]})"
    return MissingSegmentationError(
        f"{where}{what} (category_id {obj.get('category_id')}, bbox {obj.get('bbox')}) has no 'segmentation': "
        "mask-classification models need a polygon or RLE mask for every annotation that is not iscrowd"
    )


def annotations_to_mask_instances(annotations, transforms, image_shape, valid=None, record=None):
    """Non-crowd annotations, transformed -> Instances with gt_classes, gt_masks (bool [N, H, W]) and
    gt_boxes enclosing the masks; objects left without a pixel (e.g. cropped away) are dropped.
    ``valid`` (bool HW) clears padding, which transformed RLE masks would otherwise fill. ``record`` (the
    dataset dict) only names the image, its annotation file and the annotation in errors."""
    annos = []
    for index, obj in enumerate(annotations):
        if obj.get("iscrowd", 0):
            continue
        if "segmentation" not in obj:
            raise _missing_segmentation(obj, index, record)
        obj = dict(obj)
        obj.pop("keypoints", None)
        annos.append(d2_utils.transform_instance_annotations(obj, transforms, image_shape))
    instances = d2_utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
    if not instances.has("gt_masks"):
        instances.gt_masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
    if valid is not None:
        instances.gt_masks = BitMasks(instances.gt_masks.tensor & torch.as_tensor(valid))
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    instances = instances[instances.gt_masks.nonempty()]
    instances.gt_masks = instances.gt_masks.tensor
    return instances


def _pad_instances(instances, image, size_divisibility):
    image, masks, _ = pad_to_divisibility(image, size_divisibility, masks=instances.gt_masks)
    padded = Instances(tuple(image.shape[-2:]))
    padded.gt_classes = instances.gt_classes
    padded.gt_masks = masks
    padded.gt_boxes = instances.gt_boxes
    return image, padded


@MAPPER_REGISTRY.register("mask_former_semantic")
class MaskFormerSemanticMapper:
    """Training: ``image``, ``sem_seg`` (int64 HW) and ``instances`` (per-class masks); both padded
    to ``INPUT.SIZE_DIVISIBILITY`` (labels with ignore). Augmentation: the ``semantic`` mapper's
    resize / category-area crop / flip, with ``INPUT.COLOR_AUG_SSD`` before the flip."""

    supports_crop_center = True  # training crops around a record's "crop_center" (centroid sampling)
    supports_crop_size = True  # and at a record's "crop_size" (crop-size schedules)

    @configurable
    def __init__(self, *, is_train, augmentations, image_format, num_classes, ignore_label, size_divisibility):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility

    @classmethod
    def from_config(cls, cfg, is_train=True):
        augs = build_semantic_augmentations(cfg, is_train)
        return {
            "is_train": is_train,
            "augmentations": _with_color_aug(augs, cfg) if is_train else augs,
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict):
        record = copy.copy(dataset_dict)
        image = read_image(record["file_name"], self.image_format)
        d2_utils.check_image_size(record, image)
        record.pop("annotations", None)
        if not self.is_train:
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            record["image"] = _image_tensor(aug_input.image)
            return record
        sem_seg_file = record.pop("sem_seg_file_name", None)
        if sem_seg_file is None:
            raise KeyError(f"image {record['file_name']} has no 'sem_seg_file_name' to train a semantic model on")
        sem_seg = read_sem_seg(sem_seg_file, self.num_classes, self.ignore_label)
        if sem_seg.shape != image.shape[:2]:
            raise ValueError(
                f"label map {sem_seg_file} is {sem_seg.shape[::-1]} (WxH) but image "
                f"{record['file_name']} is {image.shape[1::-1]}"
            )
        aug_input = CenteredAugInput(image, sem_seg=sem_seg, crop_center=record.get("crop_center"),
                                     crop_size=record.get("crop_size"))
        self.augmentations(aug_input)
        image, _, sem_seg = pad_to_divisibility(
            _image_tensor(aug_input.image), self.size_divisibility,
            sem_seg=torch.as_tensor(aug_input.sem_seg.astype("int64")), ignore_label=self.ignore_label,
        )
        record["image"] = image
        record["sem_seg"] = sem_seg
        record["instances"] = sem_seg_to_instances(sem_seg, self.ignore_label)
        return record


def _instance_train_augmentations(cfg):
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return _with_color_aug(augs + _flip(cfg), cfg)


def _lsj_train_augmentations(cfg):
    size = cfg.INPUT.IMAGE_SIZE
    return _flip(cfg) + [
        T.ResizeScale(min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size, target_width=size),
        T.FixedSizeCrop(crop_size=(size, size)),
    ]


class _InstanceMapperBase:
    @configurable
    def __init__(self, *, is_train, augmentations, image_format, size_divisibility=-1):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility

    def _read_and_augment(self, record):
        image = read_image(record["file_name"], self.image_format)
        d2_utils.check_image_size(record, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        return aug_input.image, transforms, image.shape[:2]

    def _instances(self, record, image_shape, transforms, valid=None):
        if "annotations" not in record:
            raise KeyError(f"image {record['file_name']} has no 'annotations' to train an instance model on")
        return annotations_to_mask_instances(record.pop("annotations"), transforms, image_shape, valid, record)


@MAPPER_REGISTRY.register("mask_former_instance")
class MaskFormerInstanceMapper(_InstanceMapperBase):
    """Training: ``image`` and ``instances`` from COCO-style annotations (polygons or RLE), after
    resize / crop (``INPUT.CROP``) / optional ``COLOR_AUG_SSD`` / flip, padded to ``INPUT.SIZE_DIVISIBILITY``."""

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": _instance_train_augmentations(cfg) if is_train else _test_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict):
        record = copy.copy(dataset_dict)
        image, transforms, _ = self._read_and_augment(record)
        if not self.is_train:
            record.pop("annotations", None)
            record["image"] = _image_tensor(image)
            return record
        instances = self._instances(record, image.shape[:2], transforms)
        record["image"], record["instances"] = _pad_instances(instances, _image_tensor(image), self.size_divisibility)
        return record


@MAPPER_REGISTRY.register("coco_instance_lsj")
class COCOInstanceLSJMapper(_InstanceMapperBase):
    """Large-scale jitter for COCO instance training: flip, resize by a random factor in
    [``INPUT.MIN_SCALE``, ``INPUT.MAX_SCALE``] of ``INPUT.IMAGE_SIZE``, then a fixed
    ``IMAGE_SIZE`` square crop padded with 128. Also gives ``padding_mask`` (True on padding)."""

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": _lsj_train_augmentations(cfg) if is_train else _test_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict):
        record = copy.copy(dataset_dict)
        image, transforms, source_shape = self._read_and_augment(record)
        record["image"] = _image_tensor(image)
        if not self.is_train:
            record.pop("annotations", None)
            return record
        valid = valid_region(transforms, source_shape)
        record["padding_mask"] = torch.as_tensor(np.ascontiguousarray(~valid))
        record["instances"] = self._instances(record, image.shape[:2], transforms, valid)
        return record
