"""The semantic-segmentation mapper: image + train-id label map, DeepLab-style augmentation.

A dataset dict with ``crop_center`` (y, x), in the original image's pixels (set by centroid sampling,
``selftrain_d2.data.samplers``), is cropped around that point instead of at random.

A training dict with ``use_soft_label`` True (set by the training loader for DATASETS.TRAIN_PSEUDO_SOFT) reads
its ``soft_label_file_name`` (the teacher's top-k class probabilities, ``selftrain_d2.data.label_files``) and
also gives ``sem_seg_soft_classes`` / ``sem_seg_soft_probs`` ``[k, H, W]``,
taken from the same source pixels as the label map: the map of each pixel's source index goes through every
transform as a label map does (nearest resize, crop, flip), so the soft label follows the hard one exactly. Its
probabilities are renormalised to sum to 1; pixels whose stored mass is below ``soft_min_mass`` get the ignore
label, as do those the hard label ignores (the confidence threshold of the pseudo labels).
"""
import copy
import functools

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T

from ..image_io import DecodeCache, read_image, read_sem_seg
from ..label_files import read_soft_label
from . import MAPPER_REGISTRY

__all__ = [
    "SemanticMapper",
    "build_semantic_augmentations",
    "CenteredAugInput",
    "CentroidCrop",
    "RandomGaussianBlur",
    "RandomSaturation",
    "pixel_index_map",
    "decode_pixel_index",
    "soft_targets_at",
]


@functools.lru_cache(maxsize=8)
def pixel_index_map(height, width):
    """``[H, W, 3]`` uint8 (4 channels beyond 2^24 pixels): each pixel's flat index ``y * W + x`` as little-endian
    bytes, an image that every transform moves as it moves a label map. Cached per size, hence read-only."""
    n = height * width
    channels = 3 if n <= 1 << 24 else 4
    index_map = np.ascontiguousarray(np.arange(n, dtype="<u4").view(np.uint8).reshape(height, width, 4)[..., :channels])
    index_map.flags.writeable = False
    return index_map


def decode_pixel_index(index_map):
    """The ``[h, w]`` flat source indices (uint32) held by a (transformed) :func:`pixel_index_map`."""
    padded = np.zeros(index_map.shape[:2] + (4,), np.uint8)
    padded[..., :index_map.shape[-1]] = index_map
    return padded.view("<u4")[..., 0]


def soft_targets_at(soft, pixels, labels, ignore_label, min_mass=0.0):
    """``(classes [k, h, w], probs [k, h, w] float32, labels [h, w])`` of a soft label (``indices`` / ``probs``
    ``[k, H, W]``) at the flat source ``pixels`` ``[h, w]``: probabilities renormalised to sum to 1, and
    ``labels`` set to ``ignore_label`` where the stored mass is below ``min_mass`` (or zero)."""
    k = soft["indices"].shape[0]
    classes = np.take(soft["indices"].reshape(k, -1), pixels, axis=1)
    probs = np.take(soft["probs"].reshape(k, -1), pixels, axis=1).astype(np.float32, copy=False)
    mass = probs.sum(0)
    keep = (mass >= min_mass) & (mass > 0)
    probs /= np.where(keep, mass, np.inf)  # 0 where not kept
    labels = labels.copy()
    labels[~keep] = ignore_label
    return classes, probs, labels


class CenteredAugInput(T.AugInput):
    """An AugInput that also carries an optional crop centre (y, x), moved along by every transform, an
    optional absolute crop size (h, w) that replaces the configured one (crop-size schedules), and an optional
    ``pixel_index`` map (:func:`pixel_index_map`) transformed as the label map is."""

    def __init__(self, image, *, sem_seg=None, crop_center=None, crop_size=None, pixel_index=None):
        super().__init__(image, sem_seg=sem_seg)
        self.crop_center = None if crop_center is None else tuple(float(v) for v in crop_center)
        self.crop_size = None if crop_size is None else tuple(int(v) for v in crop_size)
        self.pixel_index = pixel_index

    def transform(self, tfm):
        super().transform(tfm)
        if self.pixel_index is not None:
            self.pixel_index = tfm.apply_segmentation(self.pixel_index)
        if self.crop_center is not None:
            y, x = self.crop_center
            # Pixel (y, x) covers [x, x + 1) x [y, y + 1): transform its middle.
            (x, y), = tfm.apply_coords(np.array([[x + 0.5, y + 0.5]], np.float64)) - 0.5
            self.crop_center = (float(y), float(x))


class CentroidCrop(T.Augmentation):
    """Crop of ``crop_type`` / ``crop_size`` (as T.RandomCrop) centred on the input's ``crop_center``
    shifted by a uniform jitter of up to ``jitter`` x the crop size, kept inside the image. Inputs
    without a centre get ``fallback``'s crop, drawing exactly the random numbers it would alone."""

    def __init__(self, crop_type, crop_size, jitter, fallback):
        super().__init__()
        self.size_of = T.RandomCrop(crop_type, crop_size)
        self.jitter = float(jitter)
        self.fallback = fallback
        self._resized = {}  # absolute crop size -> (size_of, fallback) for inputs that carry a crop_size

    def _for_size(self, crop_size):
        """This crop at another absolute size (crop-size schedules): the same rule, a different size."""
        if crop_size not in self._resized:
            fb = self.fallback
            if isinstance(fb, T.RandomCrop_CategoryAreaConstraint):
                fb = T.RandomCrop_CategoryAreaConstraint("absolute", crop_size, fb.single_category_max_area,
                                                         fb.ignored_category)
            elif isinstance(fb, T.RandomCrop):
                fb = T.RandomCrop("absolute", crop_size)
            else:
                raise TypeError(f"cannot resize the fallback crop {type(fb).__name__} for a crop schedule")
            self._resized[crop_size] = (T.RandomCrop("absolute", crop_size), fb)
        return self._resized[crop_size]

    def __call__(self, aug_input):
        center = getattr(aug_input, "crop_center", None)
        size = getattr(aug_input, "crop_size", None)
        size_of, fallback = self._for_size(size) if size is not None else (self.size_of, self.fallback)
        if center is None:
            return fallback(aug_input)
        tfm = self.get_transform(aug_input.image, center, size_of)
        aug_input.transform(tfm)
        return tfm

    def get_transform(self, image, center, size_of=None):
        h, w = image.shape[:2]
        ch, cw = (size_of or self.size_of).get_crop_size((h, w))
        dy, dx = np.random.uniform(-self.jitter, self.jitter, size=2) * (ch, cw)
        y0 = int(np.clip(np.floor(center[0] + 0.5 + dy - ch / 2), 0, h - ch))
        x0 = int(np.clip(np.floor(center[1] + 0.5 + dx - cw / 2), 0, w - cw))
        return T.CropTransform(x0, y0, cw, ch)


class GaussianBlurTransform(T.Transform):
    """cv2.GaussianBlur of the image with standard deviation ``sigma``; labels and points unchanged."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = float(sigma)

    def apply_image(self, img):
        return cv2.GaussianBlur(img, (0, 0), self.sigma)

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation

    def inverse(self):
        return T.NoOpTransform()


class RandomGaussianBlur(T.Augmentation):
    """With probability ``prob``, blur with a sigma drawn uniformly from ``sigma_range``."""

    def __init__(self, prob, sigma_range):
        super().__init__()
        self.prob = float(prob)
        self.sigma_range = tuple(float(s) for s in sigma_range)

    def get_transform(self, image):
        if np.random.rand() >= self.prob:
            return T.NoOpTransform()
        return GaussianBlurTransform(np.random.uniform(*self.sigma_range))


class RandomSaturation(T.Augmentation):
    """Blend with the grayscale image by a factor drawn from [intensity_min, intensity_max]; unlike
    T.RandomSaturation it weighs the channels right for BGR input too."""

    def __init__(self, intensity_min, intensity_max, image_format="RGB"):
        super().__init__()
        self.intensity_min, self.intensity_max = intensity_min, intensity_max
        weights = [0.299, 0.587, 0.114]
        self.weights = weights[::-1] if image_format == "BGR" else weights

    def get_transform(self, image):
        w = np.random.uniform(self.intensity_min, self.intensity_max)
        grayscale = image.dot(self.weights)[:, :, np.newaxis]
        return T.BlendTransform(src_image=grayscale, src_weight=1 - w, dst_weight=w)


def _photometric_augmentations(cfg):
    augs = []
    s = cfg.INPUT.COLOR_JITTER
    if s > 0:
        augs += [T.RandomBrightness(1 - s, 1 + s), T.RandomContrast(1 - s, 1 + s),
                 RandomSaturation(1 - s, 1 + s, cfg.INPUT.FORMAT)]
    if cfg.INPUT.GAUSSIAN_BLUR > 0:
        augs.append(RandomGaussianBlur(cfg.INPUT.GAUSSIAN_BLUR, cfg.INPUT.GAUSSIAN_BLUR_SIGMA))
    return augs


def build_semantic_augmentations(cfg, is_train):
    """Resize by the shortest edge, then (training) a class-area-constrained crop (or one around the
    record's ``crop_center``), a flip and the optional colour jitter and Gaussian blur."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        area_crop = T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE,
            cfg.INPUT.CROP.SIZE,
            cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )
        jitter = cfg.DATALOADER.CENTROID_SAMPLING.JITTER
        augs.append(CentroidCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, jitter, fallback=area_crop))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs + _photometric_augmentations(cfg)


@MAPPER_REGISTRY.register("semantic")
class SemanticMapper:
    """dataset dict -> {"image": CHW uint8 tensor, "sem_seg": HW long tensor (training), ...}.

    Label maps are checked against the class count, so a PNG with foreign ids fails with its name.
    At test time the label is not read: Detectron2's evaluators read the ground truth themselves.
    """

    supports_crop_center = True  # training crops around a record's "crop_center" (centroid sampling)
    supports_crop_size = True  # and at a record's "crop_size" (crop-size schedules)

    supports_soft_labels = True  # a record's "soft_label_file_name" when its "use_soft_label" is True

    @configurable
    def __init__(self, *, is_train, augmentations, image_format, num_classes, ignore_label, decode_cache_mb=0,
                 soft_min_mass=0.0):
        self.is_train = is_train
        self.cache = DecodeCache(decode_cache_mb * 2**20) if decode_cache_mb > 0 else None
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.soft_min_mass = soft_min_mass

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_semantic_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "decode_cache_mb": cfg.DATALOADER.DECODE_CACHE_MB if is_train else 0,
            "soft_min_mass": cfg.DATALOADER.SOFT_LABEL_MIN_MASS,
        }

    def _read_soft(self, record, image_shape):
        path = record["soft_label_file_name"]
        soft = read_soft_label(path)
        if soft["indices"].shape[1:] != image_shape or soft["num_classes"] != self.num_classes:
            raise ValueError(
                f"soft pseudo label {path} holds {soft['num_classes']} classes at {soft['indices'].shape[:0:-1]} "
                f"(WxH), but the model has {self.num_classes} classes and image {record['file_name']} is "
                f"{image_shape[::-1]}"
            )
        return soft

    def __call__(self, dataset_dict):
        record = copy.copy(dataset_dict)
        image = read_image(record["file_name"], self.image_format, self.cache)
        d2_utils.check_image_size(record, image)
        sem_seg = None
        if self.is_train and "sem_seg_file_name" in record:
            sem_seg = read_sem_seg(record.pop("sem_seg_file_name"), self.num_classes, self.ignore_label, self.cache)
            if sem_seg.shape != image.shape[:2]:
                raise ValueError(
                    f"label map {dataset_dict['sem_seg_file_name']} is {sem_seg.shape[::-1]} (WxH) but image "
                    f"{record['file_name']} is {image.shape[1::-1]}"
                )
        center = record.get("crop_center") if self.is_train else None
        size = record.get("crop_size") if self.is_train else None
        soft = None
        if sem_seg is not None and record.pop("use_soft_label", False):
            soft = self._read_soft(record, image.shape[:2])
        pixel_index = None if soft is None else pixel_index_map(*image.shape[:2])
        aug_input = CenteredAugInput(image, sem_seg=sem_seg, crop_center=center, crop_size=size,
                                     pixel_index=pixel_index)
        self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if soft is not None:
            classes, probs, labels = soft_targets_at(soft, decode_pixel_index(aug_input.pixel_index), aug_input.sem_seg,
                                                     self.ignore_label, self.soft_min_mass)
            aug_input.sem_seg = labels
            record["sem_seg_soft_classes"] = torch.as_tensor(classes if classes.dtype == np.uint8 else
                                                             classes.astype(np.int32))
            record["sem_seg_soft_probs"] = torch.as_tensor(probs)
        if sem_seg is not None:
            record["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("int64"))
        record.pop("annotations", None)
        return record
