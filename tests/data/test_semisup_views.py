"""Weak / strong views of unlabeled images: one geometry for both, photometric changes for the strong one."""
import random

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.data import MAPPER_REGISTRY
from selftrain_d2.data.mappers.views import StrongAugParams, shift_hue, strong_photometric

OFF = ["SEMISUP.STRONG_AUG.COLOR_JITTER_PROB", 0.0, "SEMISUP.STRONG_AUG.GRAYSCALE_PROB", 0.0,
       "SEMISUP.STRONG_AUG.BLUR_PROB", 0.0, "SEMISUP.STRONG_AUG.ERASE_PROB", 0.0]


@pytest.fixture
def record(tmp_path):
    """A 60x90 image: dark noise, one bright off-centre rectangle annotated as a polygon."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, size=(60, 90, 3), dtype=np.uint8)
    image[10:30, 12:40] = 230
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, image[:, :, ::-1])
    poly = [12, 10, 40, 10, 40, 30, 12, 30]
    return {"file_name": path, "height": 60, "width": 90, "image_id": "img",
            "annotations": [{"bbox": [12, 10, 28, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
                             "segmentation": [poly], "iscrowd": 0}]}


def _mapper(name, *opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TRAIN", "(60, 72, 90)", "INPUT.MAX_SIZE_TRAIN", "1000",
                         "INPUT.CROP.ENABLED", "True", "INPUT.CROP.TYPE", "absolute", "INPUT.CROP.SIZE", "(48, 64)",
                         "INPUT.RANDOM_FLIP", "horizontal", *opts])
    return MAPPER_REGISTRY.get(name)(cfg, True)


def _seeded(mapper, record, seed):
    np.random.seed(seed)
    random.seed(seed)
    return mapper(dict(record))


def _iou(a, b):
    return float((a & b).sum()) / max(1, float((a | b).sum()))


def _bright(image_chw, threshold=128):
    return image_chw.float().mean(0) > threshold


def test_views_share_the_geometry_and_differ_only_in_colour(record):
    mapper = _mapper("mask_former_instance_weak_strong", *OFF)
    flipped = set()
    for seed in range(12):
        out = _seeded(mapper, record, seed)
        weak, strong = out["image"], out["image_strong"]
        assert weak.shape == strong.shape == (3, 48, 64) and weak.dtype == torch.uint8
        assert torch.equal(weak, strong)  # every strong augmentation off: identical pixels
        bright = _bright(weak)
        if len(out["instances"]) == 0:  # the crop missed the object
            assert bright.sum() < 4
            continue
        mask = out["instances"].gt_masks[0]
        assert _iou(mask, bright) > 0.85  # labels went through the image's flip / resize / crop
        cols = mask.any(0).nonzero()
        flipped.add(int(cols.min()) > 64 - int(cols.max()) - 1)
    assert {True, False} <= flipped  # both flipped and unflipped draws happened

    jitter = _mapper("mask_former_instance_weak_strong", *OFF, "SEMISUP.STRONG_AUG.COLOR_JITTER_PROB", 1.0)
    for seed in range(4):
        out = _seeded(jitter, record, seed)
        weak, strong = out["image"], out["image_strong"]
        assert not torch.equal(weak, strong)
        lo, hi = strong.float().mean(0).min(), strong.float().mean(0).max()
        # Colour jitter keeps the bright object where it is: the same pixels, brighter than the rest.
        assert torch.equal(_bright(strong, float(lo + hi) / 2), _bright(weak))


def test_views_are_a_function_of_the_seed(record):
    mapper = _mapper("mask_former_instance_weak_strong")
    a, b, c = (_seeded(mapper, record, s) for s in (3, 3, 4))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_strong"], b["image_strong"])
    assert not (torch.equal(a["image"], c["image"]) and torch.equal(a["image_strong"], c["image_strong"]))


def test_strong_augmentations_by_hand():
    image = np.full((20, 30, 3), 100, np.uint8)
    image[:, :, 0] = 200
    gray = StrongAugParams(color_jitter_prob=0, grayscale_prob=1, blur_prob=0, erase_prob=0)
    out = strong_photometric(image, gray, "RGB")
    assert (out == round(0.299 * 200 + 0.587 * 100 + 0.114 * 100)).all()
    erase = StrongAugParams(color_jitter_prob=0, grayscale_prob=0, blur_prob=0, erase_prob=1, erase_count=2,
                            erase_scale=(0.1, 0.1), erase_ratio=(1.0, 1.0))
    np.random.seed(0)
    out = strong_photometric(image, erase, "RGB")
    changed = (out != image).any(2)
    assert 0 < changed.sum() <= 2 * 60 and changed.shape == (20, 30)  # two boxes of ~sqrt(60)^2 pixels
    none = StrongAugParams(color_jitter_prob=0, grayscale_prob=0, blur_prob=0, erase_prob=0)
    assert np.array_equal(strong_photometric(image, none, "RGB"), image)


def test_semantic_and_lsj_variants(record, tmp_path):
    label = np.zeros((60, 90), np.uint8)
    label[10:30, 12:40] = 2
    cv2.imwrite(str(tmp_path / "label.png"), label)
    sem_record = {k: v for k, v in record.items() if k != "annotations"}
    sem_record["sem_seg_file_name"] = str(tmp_path / "label.png")
    mapper = _mapper("mask_former_semantic_weak_strong", *OFF, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3")
    for seed in range(3):
        out = _seeded(mapper, sem_record, seed)
        assert torch.equal(out["sem_seg"] == 2, _bright(out["image"])) and torch.equal(out["image"], out["image_strong"])
    lsj = _mapper("coco_instance_lsj_weak_strong", "INPUT.IMAGE_SIZE", "96", "INPUT.MIN_SCALE", "0.5",
                  "INPUT.MAX_SCALE", "0.6", "SEMISUP.STRONG_AUG.COLOR_JITTER_PROB", 1.0)
    out = _seeded(lsj, record, 0)
    pad = out["padding_mask"]
    assert out["image"].shape[-2:] == (96, 96) and pad.any()
    # padding is left as padding in the strong view
    assert torch.equal(out["image"][:, pad], out["image_strong"][:, pad])
    with pytest.raises(ValueError, match="training views only"):
        MAPPER_REGISTRY.get("mask_former_instance_weak_strong")(get_selftrain_cfg(), False)


def test_strong_view_defaults_are_the_reference_codes():
    params = StrongAugParams.from_config(get_selftrain_cfg())
    # torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur 0.5 at sigma 0.1..2, no erasing.
    assert (params.color_jitter_prob, params.brightness, params.contrast, params.saturation, params.hue) == (
        0.8, 0.4, 0.4, 0.4, 0.1)
    assert (params.grayscale_prob, params.blur_prob, params.blur_sigma) == (0.2, 0.5, (0.1, 2.0))
    assert params.erase_prob == 0.0
    assert StrongAugParams() == params
    cfg = get_selftrain_cfg()
    cfg.SEMISUP.STRONG_AUG.HUE = 0.7
    with pytest.raises(ValueError, match="SEMISUP.STRONG_AUG.HUE=0.7"):
        StrongAugParams.from_config(cfg)


def test_default_strong_view_erases_nothing(record):
    # Colour jitter, grayscale and blur off, everything else at its default: the strong view is the weak one.
    mapper = _mapper("mask_former_instance_weak_strong", "SEMISUP.STRONG_AUG.COLOR_JITTER_PROB", 0.0,
                     "SEMISUP.STRONG_AUG.GRAYSCALE_PROB", 0.0, "SEMISUP.STRONG_AUG.BLUR_PROB", 0.0)
    for seed in range(8):
        out = _seeded(mapper, record, seed)
        assert torch.equal(out["image"], out["image_strong"])


def test_hue_shift_by_hand():
    red = np.zeros((2, 3, 3), np.float32)
    red[:, :, 0] = 255
    np.testing.assert_allclose(shift_hue(red, 1 / 3), np.broadcast_to([0, 255, 0], red.shape), atol=0.01)
    np.testing.assert_allclose(shift_hue(red, -1 / 3), np.broadcast_to([0, 0, 255], red.shape), atol=0.01)
    np.testing.assert_allclose(shift_hue(red[:, :, ::-1], 1 / 3, "BGR"), np.broadcast_to([0, 255, 0], red.shape),
                               atol=0.01)  # BGR in, BGR out: green stays in the middle channel
    pink = np.full((1, 1, 3), 100, np.float32)
    pink[..., 0] = 200
    np.testing.assert_allclose(shift_hue(pink, 0.5), [[[100, 200, 200]]], atol=0.01)  # half a turn: cyan


def test_colour_jitter_turns_the_hue_within_the_range():
    # Only the hue changes (brightness, contrast, saturation factors are 1): hue of red (0 degrees) moves by at
    # most HUE turns (0.1 = 36 degrees), both ways over seeds; saturation and value stay.
    red = np.zeros((4, 4, 3), np.uint8)
    red[:, :, 0] = 255
    params = StrongAugParams(color_jitter_prob=1, brightness=0, contrast=0, saturation=0, hue=0.1, grayscale_prob=0,
                             blur_prob=0, erase_prob=0)
    hues = []
    for seed in range(20):
        np.random.seed(seed)
        hsv = cv2.cvtColor(strong_photometric(red, params, "RGB"), cv2.COLOR_RGB2HSV_FULL).astype(int)
        assert (hsv == hsv[0, 0]).all() and hsv[0, 0, 1] == 255 and hsv[0, 0, 2] == 255
        hues.append((hsv[0, 0, 0] + 128) % 256 - 128)  # signed, in 1/256 turns
    assert max(abs(h) for h in hues) <= 0.1 * 256 + 1
    assert min(hues) < -5 and max(hues) > 5
