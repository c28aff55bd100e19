"""The mask-classification mappers on tiny synthetic images: shapes, classes, ignore, padding, masks."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, polygons_to_bitmask
from PIL import Image

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.data import MAPPER_REGISTRY, build_mapper
from selftrain_d2.data.image_io import LabelValueError
from selftrain_d2.data.mappers.mask_former import annotations_to_mask_instances, pad_to_divisibility

H, W = 40, 50
# No resize (the shortest edge stays 40), no crop, no flip unless a test asks for them.
PLAIN = ["INPUT.MIN_SIZE_TRAIN", f"({H},)", "INPUT.MAX_SIZE_TRAIN", "1000", "INPUT.MIN_SIZE_TEST", "80",
         "INPUT.MAX_SIZE_TEST", "1000", "INPUT.CROP.ENABLED", "False", "INPUT.RANDOM_FLIP", "none",
         "INPUT.FORMAT", "RGB", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"]


def _cfg(mapper, *opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(PLAIN + ["INPUT.DATASET_MAPPER_NAME", mapper, *opts])
    return cfg


def _image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    return str(path)


def _semantic_record(tmp_path, label):
    png = tmp_path / "label.png"
    Image.fromarray(label.astype(np.uint8)).save(png)
    return {"file_name": _image(tmp_path), "sem_seg_file_name": str(png), "height": H, "width": W, "image_id": "a"}


def _label():
    label = np.full((H, W), 4, np.uint8)
    label[:, :20] = 1
    label[30:, 30:] = 255
    return label


def test_all_mask_former_mappers_are_registered():
    assert {"mask_former_semantic", "mask_former_instance", "coco_instance_lsj"} <= set(MAPPER_REGISTRY._obj_map)


def test_semantic_mapper_gives_one_mask_per_present_class_and_pads_with_ignore(tmp_path):
    record = _semantic_record(tmp_path, _label())
    out = build_mapper(_cfg("mask_former_semantic", "INPUT.SIZE_DIVISIBILITY", "32"), is_train=True)(record)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
    assert (out["image"][:, H:, :] == 128).all() and (out["image"][:, :, W:] == 128).all()
    sem_seg = out["sem_seg"]
    assert sem_seg.shape == (64, 64) and sem_seg.dtype == torch.int64
    assert torch.equal(sem_seg[:H, :W], torch.as_tensor(_label(), dtype=torch.int64))
    assert (sem_seg[H:, :] == 255).all() and (sem_seg[:, W:] == 255).all()

    inst = out["instances"]
    assert inst.image_size == (64, 64)
    assert inst.gt_classes.tolist() == [1, 4] and inst.gt_classes.dtype == torch.int64
    assert inst.gt_masks.shape == (2, 64, 64) and inst.gt_masks.dtype == torch.bool
    for c, m in zip(inst.gt_classes, inst.gt_masks):
        assert torch.equal(m, sem_seg == c)
    assert not inst.gt_masks[:, 30:H, 30:W].any()  # ignore belongs to no mask
    assert "sem_seg_file_name" in record  # the dataset dict is left as it was


def test_semantic_mapper_without_padding_and_all_ignore(tmp_path):
    record = _semantic_record(tmp_path, np.full((H, W), 255))
    out = build_mapper(_cfg("mask_former_semantic"), is_train=True)(record)
    assert out["image"].shape == (3, H, W)
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.shape == (0, H, W)


def test_semantic_mapper_test_mode_only_resizes(tmp_path):
    record = _semantic_record(tmp_path, np.full((H, W), 200))  # a bad label is not read at test time
    out = build_mapper(_cfg("mask_former_semantic", "INPUT.SIZE_DIVISIBILITY", "32"), is_train=False)(record)
    assert out["image"].shape == (3, 80, 100) and "sem_seg" not in out and "instances" not in out


def test_semantic_mapper_checks_label_ids(tmp_path):
    label = _label()
    label[0, 0] = 9
    with pytest.raises(LabelValueError, match="label.png"):
        build_mapper(_cfg("mask_former_semantic"), is_train=True)(_semantic_record(tmp_path, label))


def test_semantic_mapper_crop_and_flip_keep_image_and_label_aligned(tmp_path):
    label = _label()
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = label  # the image's red channel is the label map
    Image.fromarray(image).save(tmp_path / "img.png")
    png = tmp_path / "label.png"
    Image.fromarray(label).save(png)
    record = {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(png), "height": H, "width": W}
    cfg = _cfg("mask_former_semantic", "INPUT.CROP.ENABLED", "True", "INPUT.CROP.TYPE", "absolute",
               "INPUT.CROP.SIZE", "(24, 32)", "INPUT.RANDOM_FLIP", "horizontal")
    mapper = build_mapper(cfg, is_train=True)
    for seed in range(6):
        np.random.seed(seed)
        out = mapper(record)
        assert out["sem_seg"].shape == (24, 32)
        assert torch.equal(out["image"][0].long(), out["sem_seg"])
        for c, m in zip(out["instances"].gt_classes, out["instances"].gt_masks):
            assert torch.equal(m, out["sem_seg"] == c)


def _aug_names(mapper):
    return [type(getattr(a, "tfm", a)).__name__ for a in mapper.augmentations.augs]  # Transforms are wrapped


def test_color_aug_ssd_comes_before_the_flip(tmp_path):
    cfg = _cfg("mask_former_semantic", "INPUT.COLOR_AUG_SSD", "True", "INPUT.RANDOM_FLIP", "horizontal")
    augs = _aug_names(build_mapper(cfg, is_train=True))
    assert augs.index("ColorAugSSDTransform") + 1 == augs.index("RandomFlip")
    inst = _cfg("mask_former_instance", "INPUT.COLOR_AUG_SSD", "True", "INPUT.RANDOM_FLIP", "horizontal",
                "INPUT.CROP.ENABLED", "True", "INPUT.CROP.TYPE", "absolute", "INPUT.CROP.SIZE", "(24, 32)")
    augs = _aug_names(build_mapper(inst, is_train=True))
    assert augs == ["ResizeShortestEdge", "RandomCrop", "ColorAugSSDTransform", "RandomFlip"]
    plain = _cfg("mask_former_instance", "INPUT.COLOR_AUG_SSD", "True")
    out = build_mapper(plain, is_train=True)(_instance_record(tmp_path))  # colours change, masks do not
    for got, want in zip(out["instances"].gt_masks, _expected_masks()):
        assert torch.equal(got, torch.from_numpy(want))


# Instances: two polygons, an RLE mask, a crowd region (skipped) and a polygon outside a later crop.
POLY_A = [[2.0, 2.0, 20.0, 2.0, 20.0, 15.0, 2.0, 15.0]]
POLY_B = [[25.0, 5.0, 45.0, 30.0, 25.0, 35.0]]


def _rle_mask():
    m = np.zeros((H, W), np.uint8)
    m[20:38, 5:15] = 1
    return m


def _instance_record(tmp_path):
    def bbox(m):
        ys, xs = np.nonzero(m)
        return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]

    rle = mask_util.encode(np.asfortranarray(_rle_mask()))
    rle["counts"] = rle["counts"].decode("ascii")
    annos = [
        {"segmentation": POLY_A, "category_id": 0, "iscrowd": 0},
        {"segmentation": POLY_B, "category_id": 2, "iscrowd": 0},
        {"segmentation": rle, "category_id": 1, "iscrowd": 0},
        {"segmentation": [[0.0, 0.0, 49.0, 0.0, 49.0, 39.0]], "category_id": 1, "iscrowd": 1},
    ]
    for a in annos[:2]:
        a["bbox"] = bbox(polygons_to_bitmask(a["segmentation"], H, W))
    annos[2]["bbox"] = bbox(_rle_mask())
    annos[3]["bbox"] = [0.0, 0.0, 49.0, 39.0]
    for a in annos:
        a["bbox_mode"] = BoxMode.XYXY_ABS
    return {"file_name": _image(tmp_path), "height": H, "width": W, "image_id": "a", "annotations": annos}


def _expected_masks():
    return [polygons_to_bitmask(POLY_A, H, W), polygons_to_bitmask(POLY_B, H, W), _rle_mask().astype(bool)]


def test_instance_mapper_masks_match_polygons_and_rle(tmp_path):
    record = _instance_record(tmp_path)
    out = build_mapper(_cfg("mask_former_instance", "INPUT.SIZE_DIVISIBILITY", "32"), is_train=True)(record)
    assert out["image"].shape == (3, 64, 64) and (out["image"][:, H:] == 128).all()
    inst = out["instances"]
    assert inst.image_size == (64, 64)
    assert inst.gt_classes.tolist() == [0, 2, 1]  # the crowd region is not a target
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (3, 64, 64)
    for got, want in zip(inst.gt_masks, _expected_masks()):
        assert torch.equal(got[:H, :W], torch.from_numpy(want)) and not got[H:].any() and not got[:, W:].any()
    assert inst.gt_boxes.tensor[0].tolist() == [2.0, 2.0, 20.0, 15.0]
    assert "annotations" not in out and len(record["annotations"]) == 4


def test_instance_mapper_flips_masks_with_the_image(tmp_path):
    record = _instance_record(tmp_path)
    image = np.asarray(Image.open(record["file_name"]))
    mapper = build_mapper(_cfg("mask_former_instance", "INPUT.RANDOM_FLIP", "horizontal"), is_train=True)
    seen = set()
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(record)
        flipped = not np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)
        seen.add(flipped)
        for got, want in zip(out["instances"].gt_masks, _expected_masks()):
            assert torch.equal(got, torch.from_numpy(want[:, ::-1].copy() if flipped else want))
    assert seen == {True, False}


def test_instance_mapper_test_mode_drops_annotations(tmp_path):
    out = build_mapper(_cfg("mask_former_instance"), is_train=False)(_instance_record(tmp_path))
    assert out["image"].shape == (3, 80, 100) and "instances" not in out and "annotations" not in out


def test_objects_cropped_away_are_dropped(tmp_path):
    annos = _instance_record(tmp_path)["annotations"]
    crop = T.TransformList([T.CropTransform(0, 0, 22, 18)])  # keeps only the top-left corner
    inst = annotations_to_mask_instances(annos, crop, (18, 22))
    assert inst.gt_classes.tolist() == [0]
    assert torch.equal(inst.gt_masks[0], torch.from_numpy(polygons_to_bitmask(POLY_A, H, W)[:18, :22]))


def test_missing_segmentation_is_a_clear_error(tmp_path):
    annos = [{"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "id": 17}]
    with pytest.raises(KeyError, match="segmentation"):
        annotations_to_mask_instances(annos, T.TransformList([]), (H, W))


def test_lsj_mapper_resizes_crops_to_a_square_and_clears_padding(tmp_path):
    record = _instance_record(tmp_path)
    cfg = _cfg("coco_instance_lsj", "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SCALE", "0.5", "INPUT.MAX_SCALE", "0.5")
    out = build_mapper(cfg, is_train=True)(record)
    # Scale 0.5 of a 64 square: the 40x50 image fits 32x32 at 0.64, i.e. 26x32, padded to 64x64.
    assert out["image"].shape == (3, 64, 64)
    pad = out["padding_mask"]
    assert pad.shape == (64, 64) and pad.dtype == torch.bool
    assert not pad[:26, :32].any() and pad[26:].all() and pad[:, 32:].all()
    assert (out["image"][:, 26:] == 128).all()
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 2, 1] and inst.gt_masks.shape == (3, 64, 64)
    assert not (inst.gt_masks & pad).any()  # the RLE mask is not spread over the padding
    resize = T.ResizeTransform(H, W, 26, 32)
    want_rle = resize.apply_segmentation(_rle_mask()).astype(bool)
    assert torch.equal(inst.gt_masks[2, :26, :32], torch.from_numpy(want_rle))


def test_lsj_mapper_with_a_large_scale_crops_inside_the_image(tmp_path):
    cfg = _cfg("coco_instance_lsj", "INPUT.IMAGE_SIZE", "32", "INPUT.MIN_SCALE", "2.0", "INPUT.MAX_SCALE", "2.0")
    mapper = build_mapper(cfg, is_train=True)
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(_instance_record(tmp_path))
        assert out["image"].shape == (3, 32, 32) and not out["padding_mask"].any()
        assert all(m.any() for m in out["instances"].gt_masks)  # objects outside the crop are gone


def test_pad_to_divisibility_leaves_multiples_alone():
    image = torch.zeros(3, 64, 32, dtype=torch.uint8)
    assert pad_to_divisibility(image, 32)[0] is image
    padded, masks, sem_seg = pad_to_divisibility(
        torch.zeros(3, 33, 32, dtype=torch.uint8), 32, masks=torch.ones(1, 33, 32, dtype=torch.bool),
        sem_seg=torch.zeros(33, 32, dtype=torch.long), ignore_label=7,
    )
    assert padded.shape == (3, 64, 32) and masks.shape == (1, 64, 32) and not masks[:, 33:].any()
    assert (sem_seg[33:] == 7).all()
