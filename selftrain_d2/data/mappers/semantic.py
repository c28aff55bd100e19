"""The semantic-segmentation mapper: image + train-id label map, DeepLab-style augmentation."""
import copy

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T

from ..image_io import read_image, read_sem_seg
from . import MAPPER_REGISTRY

__all__ = ["SemanticMapper", "build_semantic_augmentations"]


def build_semantic_augmentations(cfg, is_train):
    """Resize by the shortest edge, then (training) a class-area-constrained crop and a flip."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs


@MAPPER_REGISTRY.register("semantic")
class SemanticMapper:
    """dataset dict -> {"image": CHW uint8 tensor, "sem_seg": HW long tensor (training), ...}.

    Label maps are checked against the class count, so a PNG with foreign ids fails with its name.
    At test time the label is not read: Detectron2's evaluators read the ground truth themselves.
    """

    @configurable
    def __init__(self, *, is_train, augmentations, image_format, num_classes, ignore_label):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_semantic_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def __call__(self, dataset_dict):
        record = copy.copy(dataset_dict)
        image = read_image(record["file_name"], self.image_format)
        d2_utils.check_image_size(record, image)
        sem_seg = None
        if self.is_train and "sem_seg_file_name" in record:
            sem_seg = read_sem_seg(record.pop("sem_seg_file_name"), self.num_classes, self.ignore_label)
            if sem_seg.shape != image.shape[:2]:
                raise ValueError(
                    f"label map {dataset_dict['sem_seg_file_name']} is {sem_seg.shape[::-1]} (WxH) but image "
                    f"{record['file_name']} is {image.shape[1::-1]}"
                )
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            record["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("int64"))
        record.pop("annotations", None)
        return record
