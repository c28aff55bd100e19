"""Two views of each unlabeled image for online teacher-student training.

The geometric augmentation (resize, crop, flip) is drawn once and applied to the image; that is the
weak view (``image``), which the teacher labels. The strong view (``image_strong``) is the same
pixels after photometric changes only (colour jitter, grayscale, Gaussian blur, optional random erasing;
``SEMISUP.STRONG_AUG``, by default the reference code's), so the teacher's pseudo labels on the weak view
are the student's targets on the strong one without any warping. Every random draw comes from NumPy's
global RNG, which the training stream seeds per sample, so the views are a pure function of (seed, position).

Labels, when a record has them (tests, pseudo-label quality checks), go through the same geometry:
``instances`` for the instance variants, ``sem_seg`` for the semantic one.
"""
import copy
from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ..image_io import read_image, read_sem_seg
from . import MAPPER_REGISTRY
from .mask_former import (
    _flip,
    _image_tensor,
    _lsj_train_augmentations,
    annotations_to_mask_instances,
    pad_to_divisibility,
    valid_region,
)

__all__ = [
    "StrongAugParams",
    "shift_hue",
    "strong_photometric",
    "WeakStrongMapper",
    "InstanceWeakStrongMapper",
    "LSJInstanceWeakStrongMapper",
    "SemanticWeakStrongMapper",
]


@dataclass(frozen=True)
class StrongAugParams:
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    erase_prob: float = 0.0
    erase_count: int = 1
    erase_scale: Tuple[float, float] = (0.02, 0.2)
    erase_ratio: Tuple[float, float] = (0.3, 3.3)

    @classmethod
    def from_config(cls, cfg):
        sa = cfg.SEMISUP.STRONG_AUG
        if not 0.0 <= sa.HUE <= 0.5:
            raise ValueError(f"SEMISUP.STRONG_AUG.HUE={sa.HUE}: the hue shift is in turns of the hue circle, "
                             "so 0 <= HUE <= 0.5")
        return cls(sa.COLOR_JITTER_PROB, sa.BRIGHTNESS, sa.CONTRAST, sa.SATURATION, sa.HUE, sa.GRAYSCALE_PROB,
                   sa.BLUR_PROB, tuple(sa.BLUR_SIGMA), sa.ERASE_PROB, sa.ERASE_COUNT, tuple(sa.ERASE_SCALE),
                   tuple(sa.ERASE_RATIO))


def _gray_weights(image_format):
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return weights[::-1].copy() if image_format == "BGR" else weights


def _factor(strength):
    return np.random.uniform(max(0.0, 1.0 - strength), 1.0 + strength)


def shift_hue(img, shift, image_format="RGB"):
    """``img`` (HWC float32, 3 channels, 0..255) with its hue turned by ``shift`` of the hue circle
    (0.5 = half a turn); saturation and value are kept."""
    to_hsv, from_hsv = ((cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR) if image_format == "BGR"
                        else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB))
    hsv = cv2.cvtColor(np.ascontiguousarray(img, np.float32) / 255.0, to_hsv)  # float input: hue in degrees
    hsv[:, :, 0] = np.mod(hsv[:, :, 0] + 360.0 * shift, 360.0)
    return cv2.cvtColor(hsv, from_hsv) * 255.0


def _color_jitter(img, params, weights, image_format):
    # torchvision's ColorJitter (the reference's): factors drawn once, the four changes in a random order,
    # each clipped to the pixel range.
    b, c, s = _factor(params.brightness), _factor(params.contrast), _factor(params.saturation)
    h = np.random.uniform(-params.hue, params.hue) if params.hue > 0 else 0.0
    for op in np.random.permutation(4):
        if op == 0:
            img = img * b
        elif op == 1:
            img = img * c + (1 - c) * float(img.dot(weights).mean())
        elif op == 2:
            img = img * s + (1 - s) * img.dot(weights)[:, :, None]
        elif h != 0.0:
            img = shift_hue(img, h, image_format)
        img = np.clip(img, 0, 255)
    return img


def strong_photometric(image, params, image_format="RGB"):
    """The strong view of an HWC uint8 image (3 channels), with ``np.random``: colour jitter (brightness,
    contrast, saturation, hue), grayscale, Gaussian blur and random erasing, each drawn with its
    probability; shape unchanged."""
    img = image.astype(np.float32)
    weights = _gray_weights(image_format)
    if np.random.rand() < params.color_jitter_prob:
        img = _color_jitter(img, params, weights, image_format)
    if np.random.rand() < params.grayscale_prob:
        img = np.repeat(img.dot(weights)[:, :, None], 3, axis=2)
    if np.random.rand() < params.blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), np.random.uniform(*params.blur_sigma))
    h, w = img.shape[:2]
    for _ in range(params.erase_count):
        if np.random.rand() >= params.erase_prob:
            continue
        area = np.random.uniform(*params.erase_scale) * h * w
        ratio = np.exp(np.random.uniform(np.log(params.erase_ratio[0]), np.log(params.erase_ratio[1])))
        eh = int(min(h, max(1, round(np.sqrt(area * ratio)))))
        ew = int(min(w, max(1, round(np.sqrt(area / ratio)))))
        y0, x0 = np.random.randint(0, h - eh + 1), np.random.randint(0, w - ew + 1)
        img[y0:y0 + eh, x0:x0 + ew] = np.random.randint(0, 256, size=(eh, ew, img.shape[2]))
    return np.round(np.clip(img, 0, 255)).astype(np.uint8)


def _resize_crop_flip(cfg):
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        # A plain crop: unlabeled images have no label map for a class-area constraint.
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return augs + _flip(cfg)


class WeakStrongMapper:
    """Unlabeled record -> ``image`` (weak view, CHW uint8), ``image_strong`` (strong view), plus
    ``instances`` / ``sem_seg`` when the record has labels, all padded to ``size_divisibility``."""

    labels = None  # "instances" or "sem_seg": which labels of a record are carried along

    @configurable
    def __init__(self, *, is_train, augmentations, strong, image_format, size_divisibility=-1, num_classes=0,
                 ignore_label=255):
        if not is_train:
            raise ValueError(f"{type(self).__name__} makes training views only (SEMISUP.UNLABELED_MAPPER_NAME); "
                             "the test loader uses INPUT.DATASET_MAPPER_NAME")
        self.augmentations = T.AugmentationList(augmentations)
        self.strong = strong
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.num_classes = num_classes
        self.ignore_label = ignore_label

    @classmethod
    def geometry(cls, cfg):
        return _resize_crop_flip(cfg)

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": cls.geometry(cfg),
            "strong": StrongAugParams.from_config(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def __call__(self, dataset_dict):
        record = copy.copy(dataset_dict)
        image = read_image(record["file_name"], self.image_format)
        d2_utils.check_image_size(record, image)
        annotations = record.pop("annotations", None)
        sem_seg_file = record.pop("sem_seg_file_name", None)
        sem_seg = None
        if self.labels == "sem_seg" and sem_seg_file is not None:
            sem_seg = read_sem_seg(sem_seg_file, self.num_classes, self.ignore_label)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        weak = aug_input.image
        strong = strong_photometric(weak, self.strong, self.image_format)
        valid = valid_region(transforms, image.shape[:2])
        if not valid.all():
            strong[~valid] = weak[~valid]  # padding added by the geometry stays padding
            record["padding_mask"] = torch.as_tensor(np.ascontiguousarray(~valid))
        masks = target_sem_seg = instances = None
        if self.labels == "instances" and annotations is not None:
            instances = annotations_to_mask_instances(annotations, transforms, weak.shape[:2], valid, dataset_dict)
            masks = instances.gt_masks
        if sem_seg is not None:
            target_sem_seg = torch.as_tensor(aug_input.sem_seg.astype("int64"))
        record["image"], masks, target_sem_seg = pad_to_divisibility(
            _image_tensor(weak), self.size_divisibility, masks=masks, sem_seg=target_sem_seg,
            ignore_label=self.ignore_label,
        )
        record["image_strong"], _, _ = pad_to_divisibility(_image_tensor(strong), self.size_divisibility)
        if instances is not None:
            padded = Instances(tuple(record["image"].shape[-2:]))
            padded.gt_classes = instances.gt_classes
            padded.gt_masks = masks
            padded.gt_boxes = instances.gt_boxes
            record["instances"] = padded
        if target_sem_seg is not None:
            record["sem_seg"] = target_sem_seg
        return record


@MAPPER_REGISTRY.register("mask_former_instance_weak_strong")
class InstanceWeakStrongMapper(WeakStrongMapper):
    """Weak / strong views with the ``mask_former_instance`` geometry (resize, ``INPUT.CROP``, flip)."""

    labels = "instances"


@MAPPER_REGISTRY.register("coco_instance_lsj_weak_strong")
class LSJInstanceWeakStrongMapper(WeakStrongMapper):
    """Weak / strong views with the ``coco_instance_lsj`` geometry (flip, random scale, fixed-size crop)."""

    labels = "instances"

    @classmethod
    def geometry(cls, cfg):
        return _lsj_train_augmentations(cfg)


@MAPPER_REGISTRY.register("mask_former_semantic_weak_strong")
class SemanticWeakStrongMapper(WeakStrongMapper):
    """Weak / strong views with the semantic geometry (resize, plain crop, flip); carries ``sem_seg``."""

    labels = "sem_seg"
