"""MaskFormer meta-architecture: configs, reference state dicts, post-processing, training targets,
inference, and a demo-sized model that learns."""
import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, Backbone, build_model
from detectron2.structures import BitMasks, Instances
from torch import nn

import selftrain_d2
from selftrain_d2.config import load_config
from selftrain_d2.data import MAPPER_REGISTRY, build_mapper
from selftrain_d2.data.image_io import read_sem_seg
from selftrain_d2.modeling.meta_arch import (
    Mask2FormerInstance,
    Mask2FormerSemantic,
    MaskFormer,
    instance_inference,
    mask_former_weight_dict,
    masks_to_boxes,
    panoptic_inference,
    semantic_inference,
)
from selftrain_d2.modeling.meta_arch.postprocess import instances_from_pairs
from selftrain_d2.modeling.transformer_decoder import TRANSFORMER_DECODER_REGISTRY
from selftrain_d2.solver import build_optimizer

from ..conftest import ROOT

selftrain_d2.register_all()  # every component and config key, for the registry loops below

REFERENCE = os.path.join(ROOT, "tests", "assets", "reference")
MASK_FORMER_CONFIGS = sorted(
    glob.glob(os.path.join(ROOT, "configs", "coco", "instance-segmentation", "**", "*.yaml"), recursive=True)
    + glob.glob(os.path.join(ROOT, "configs", "cityscapes", "*", "**", "*Segmentation.yaml"), recursive=True)
    + glob.glob(os.path.join(ROOT, "configs", "cityscapes", "*", "**", "maskformer2_*.yaml"), recursive=True)
    + glob.glob(os.path.join(ROOT, "configs", "demo", "*Mask2Former*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "demo", "mask2former-*.yaml"))
)
DEMO_SEMANTIC = os.path.join(ROOT, "configs", "demo", "mask2former-semantic.yaml")
DEMO_INSTANCE = os.path.join(ROOT, "configs", "demo", "mask2former-instance.yaml")
NO_DOWNLOAD = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
RANDOM_INIT = ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]


# --- configs ---------------------------------------------------------------------------------------------


def test_the_reference_experiment_configs_are_there():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in MASK_FORMER_CONFIGS}
    for task, schedule in [("coco/instance-segmentation", "50ep"), ("cityscapes/instance-segmentation", "90k"),
                           ("cityscapes/semantic-segmentation", "90k")]:
        assert {f"{task}/maskformer2_R50_bs16_{schedule}.yaml", f"{task}/swin/maskformer2_swin_tiny_bs16_{schedule}.yaml",
                f"{task}/maskformer2_dinov2_vitb14_bs16_{schedule}.yaml"} <= names
    assert {"demo/mask2former-semantic.yaml", "demo/mask2former-instance.yaml"} <= names


@pytest.mark.parametrize("path", MASK_FORMER_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_mask_former_config_merges_and_names_registered_components(path):
    cfg = load_config(path)
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    assert cfg.INPUT.DATASET_MAPPER_NAME in MAPPER_REGISTRY
    if "Base-" in os.path.basename(path):
        return
    assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.NAME in SEM_SEG_HEADS_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME in SEM_SEG_HEADS_REGISTRY
    assert cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME in TRANSFORMER_DECODER_REGISTRY
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"


def _reference_shapes(name):
    shapes = {}
    with open(os.path.join(REFERENCE, f"mask2former-{name}-R50-state-dict.tsv")) as f:
        for line in f:
            if not line.startswith("#"):
                key, shape = line.rstrip("\n").split("\t")
                shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


@pytest.mark.parametrize("config, reference", [
    ("coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml", "coco-instance"),
    ("cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml", "cityscapes-semantic"),
])
def test_r50_models_have_the_reference_state_dict(config, reference):
    model = build_model(load_config(os.path.join(ROOT, "configs", config), NO_DOWNLOAD))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = _reference_shapes(reference)
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    assert type(model) is MaskFormer and model.size_divisibility == 32
    assert len(model.criterion.weight_dict) == 3 * 10
    assert model.instance_on != model.semantic_on and not model.panoptic_on


@pytest.mark.parametrize("config", [
    "cityscapes/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_90k.yaml",
    "coco/instance-segmentation/maskformer2_dinov2_vitb14_bs16_50ep.yaml",
])
def test_transformer_backbone_models_build(config):
    model = build_model(load_config(os.path.join(ROOT, "configs", config), NO_DOWNLOAD))
    assert isinstance(model, MaskFormer) and model.sem_seg_head.num_classes in (19, 80)


def test_weight_dict_has_one_copy_per_auxiliary_layer():
    weights = mask_former_weight_dict(2.0, 5.0, 5.0, dec_layers=4)
    assert list(weights)[:6] == ["loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"]
    assert len(weights) == 12 and weights["loss_dice_2"] == 5.0 and weights["loss_ce_2"] == 2.0
    assert mask_former_weight_dict(2.0, 5.0, 5.0, dec_layers=4, deep_supervision=False) == {
        "loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


# --- post-processing on constructed logits --------------------------------------------------------------


def _left_right_logits():
    """Query 0: class 2 on the left half; query 1: class 0 on the right half; query 2: no object."""
    mask_cls = torch.tensor([[0.0, 0.0, 5.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 6.0]])
    mask_pred = torch.full((3, 4, 6), -8.0)
    mask_pred[0, :, :3] = 8.0
    mask_pred[1, :, 3:] = 8.0
    return mask_cls, mask_pred


def test_semantic_inference_labels_each_half_with_its_query_class():
    mask_cls, mask_pred = _left_right_logits()
    sem = semantic_inference(mask_cls, mask_pred)
    assert sem.shape == (3, 4, 6)
    assert (sem.argmax(0)[:, :3] == 2).all() and (sem.argmax(0)[:, 3:] == 0).all()
    probs = F.softmax(mask_cls, -1)
    s, t = torch.sigmoid(torch.tensor(8.0)), torch.sigmoid(torch.tensor(-8.0))
    expected = probs[0, 2] * s + probs[1, 2] * t + probs[2, 2] * t  # class 2 at a left pixel
    assert sem[2, 0, 0] == pytest.approx(float(expected), rel=1e-6)


def test_instance_inference_scores_by_hand():
    mask_cls = torch.log(torch.tensor([[0.6, 0.1, 0.1, 0.2], [0.05, 0.7, 0.05, 0.2]]))
    mask_pred = torch.full((2, 4, 4), -3.0)
    mask_pred[0, :2, :2] = math.log(3.0)  # sigmoid 0.75 inside a 2x2 mask
    mask_pred[1, 1:, 1:3] = math.log(9.0)  # sigmoid 0.9 inside a 3x2 mask
    out = instance_inference(mask_cls, mask_pred, num_classes=3, topk=3, boxes_from_masks=True)
    assert isinstance(out, Instances) and out.image_size == (4, 4) and len(out) == 3
    # The best (query, class) pairs: (1, 1) 0.7, (0, 0) 0.6, then 0.1 from query 0 (classes 1 and 2 tie).
    assert out.pred_classes[:2].tolist() == [1, 0]
    torch.testing.assert_close(out.scores[:2], torch.tensor([0.7 * 0.9, 0.6 * 0.75]), rtol=1e-5, atol=1e-6)
    assert out.scores[2] == pytest.approx(0.1 * 0.75, rel=1e-5)
    assert torch.equal(out.pred_masks[0], (mask_pred[1] > 0).float())
    assert out.pred_boxes.tensor[:2].tolist() == [[1.0, 1.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]
    assert out.pred_classes.dtype == torch.int64


def test_instance_inference_topk_is_capped_and_classes_can_be_filtered():
    mask_cls, mask_pred = _left_right_logits()
    assert len(instance_inference(mask_cls, mask_pred, 3, topk=100)) == 9  # 3 queries x 3 classes
    things = instance_inference(mask_cls, mask_pred, 3, topk=100, keep_classes={2})
    assert len(things) == 3 and (things.pred_classes == 2).all()
    no_boxes = instance_inference(mask_cls, mask_pred, 3, topk=2, boxes_from_masks=False)
    assert (no_boxes.pred_boxes.tensor == 0).all()
    with pytest.raises(ValueError, match="num_classes"):
        instance_inference(mask_cls, mask_pred, 5, topk=2)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_instances_from_pairs_in_chunks_equals_the_reference_formula(chunk):
    # Pairs sharing a mask, an empty mask, and a chunk size that does not divide the pairs.
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(4, 6, 7, generator=g) * 3
    masks[2] = -1.0
    rows = torch.tensor([1, 0, 1, 2, 3, 1, 0])
    scores, labels = torch.rand(7, generator=g), torch.arange(7)
    original = masks.clone()
    out = instances_from_pairs(masks, scores, labels, boxes_from_masks=True, rows=rows, chunk=chunk)
    per_pair = masks[rows]
    binary = (per_pair > 0).float()
    mask_scores = (per_pair.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    assert torch.equal(out.pred_masks, binary)
    torch.testing.assert_close(out.scores, scores * mask_scores, rtol=1e-6, atol=1e-7)
    assert out.scores[3] == 0
    assert torch.equal(out.pred_boxes.tensor, BitMasks(binary > 0).get_bounding_boxes().tensor)
    assert torch.equal(masks, original)  # the logits are not overwritten
    resized = instances_from_pairs(masks, scores, labels, rows=rows, chunk=chunk, size=(12, 14),
                                   resize=lambda m: F.interpolate(m[None], size=(12, 14), mode="bilinear")[0])
    assert resized.image_size == (12, 14) and resized.pred_masks.shape == (7, 12, 14)


def test_masks_to_boxes_matches_bitmasks():
    masks = torch.rand(6, 9, 11) > 0.9
    masks[2] = False
    masks[3] = False
    masks[3, 4, 7] = True
    assert torch.equal(masks_to_boxes(masks), BitMasks(masks).get_bounding_boxes().tensor)
    assert masks_to_boxes(torch.zeros(0, 3, 3, dtype=torch.bool)).shape == (0, 4)


def test_panoptic_inference_merges_stuff_and_keeps_things_apart():
    # Queries: 0 and 1 stuff class 0 (top / bottom rows), 2 thing class 1 (a square), 3 low-confidence.
    mask_cls = torch.tensor([[6.0, 0, 0, 0], [6.0, 0, 0, 0], [0, 6.0, 0, 0], [1.0, 1.0, 1.0, 1.0]])
    mask_pred = torch.full((4, 4, 4), -8.0)
    mask_pred[0, :2] = 8.0
    mask_pred[1, 2:] = 8.0
    mask_pred[2, 1:3, 1:3] = 9.0
    seg, info = panoptic_inference(mask_cls, mask_pred, num_classes=3, object_mask_threshold=0.8,
                                   overlap_threshold=0.5, thing_classes={1})
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 0, False), (2, 1, True)]
    assert (seg[1:3, 1:3] == 2).all() and seg.dtype == torch.int32
    assert set(seg.unique().tolist()) == {1, 2}  # the two stuff queries share segment 1
    # The square takes 2 of each stuff query's 8 pixels: with 0.8 overlap required, the stuff is dropped.
    _, info = panoptic_inference(mask_cls, mask_pred, 3, 0.8, 0.8, {1})
    assert [s["category_id"] for s in info] == [1]


def test_panoptic_inference_with_no_confident_query_is_empty():
    seg, info = panoptic_inference(torch.zeros(2, 4), torch.zeros(2, 3, 3), 3, 0.8, 0.8, set())
    assert info == [] and (seg == 0).all()


# --- the meta-architecture with stand-in parts ---------------------------------------------------------


class _Backbone(Backbone):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"res2": self.conv(F.avg_pool2d(x, 4))}

    def output_shape(self):
        return {"res2": ShapeSpec(channels=4, stride=4)}

    @property
    def size_divisibility(self):
        return 16


class _Head(nn.Module):
    """Fixed predictions: the two halves of ``_left_right_logits`` at stride 4."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        cls, masks = _left_right_logits()
        self.register_buffer("cls", cls)
        self.register_buffer("masks", masks)

    def forward(self, features):
        x = features["res2"]
        masks = F.interpolate(self.masks[None], size=x.shape[-2:], mode="nearest")
        b = x.shape[0]
        return {"pred_logits": self.cls.expand(b, -1, -1) + 0 * x.sum(), "pred_masks": masks.expand(b, -1, -1, -1)}


class _Criterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight_dict = {"loss_ce": 2.0, "loss_mask": 5.0}
        self.register_buffer("empty_weight", torch.ones(4))
        self.seen = None

    def forward(self, outputs, targets):
        self.seen = targets
        one = outputs["pred_logits"].sum() * 0 + 1
        return {"loss_ce": one, "loss_mask": 2 * one, "loss_unweighted": 3 * one}


def _model(cls=MaskFormer, **kwargs):
    args = dict(backbone=_Backbone(), sem_seg_head=_Head(), criterion=_Criterion(), num_queries=3,
                object_mask_threshold=0.8, overlap_threshold=0.8, metadata=None, size_divisibility=-1,
                sem_seg_postprocess_before_inference=False, pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0],
                semantic_on=True, panoptic_on=False, instance_on=False, test_topk_per_image=5)
    args.update(kwargs)
    return cls(**args)


def _image(h, w):
    return torch.randint(0, 255, (3, h, w), dtype=torch.uint8)


def test_training_weights_the_losses_and_pads_targets_to_the_batch():
    model = _model().train()
    a = Instances((20, 30))
    a.gt_classes = torch.tensor([1, 2])
    a.gt_masks = torch.ones(2, 20, 30, dtype=torch.bool)
    b = Instances((33, 17))
    b.gt_classes = torch.tensor([0])
    b.gt_masks = BitMasks(torch.ones(1, 33, 17, dtype=torch.bool))
    losses = model([{"image": _image(20, 30), "instances": a}, {"image": _image(33, 17), "instances": b}])
    assert losses == {"loss_ce": 2.0, "loss_mask": 10.0}
    first, second = model.criterion.seen
    # 20x30 and 33x17 batch to 48x32 (the stand-in backbone's size divisibility is 16).
    assert first["masks"].shape == (2, 48, 32) and second["masks"].shape == (1, 48, 32)
    assert first["masks"].dtype == second["masks"].dtype == torch.bool
    assert first["masks"][:, :20, :30].all() and not first["masks"][:, 20:].any() and not first["masks"][:, :, 30:].any()
    assert first["labels"].tolist() == [1, 2] and second["labels"].tolist() == [0]


def test_training_from_a_label_map_makes_one_target_per_class():
    model = _model(ignore_value=255).train()
    sem_seg = torch.tensor([[0, 0, 3], [255, 3, 3]])
    model([{"image": _image(2, 3), "sem_seg": sem_seg}])
    (target,) = model.criterion.seen
    assert target["labels"].tolist() == [0, 3]
    assert target["masks"].shape == (2, 16, 16)
    assert torch.equal(target["masks"][:, :2, :3], torch.stack([sem_seg == 0, sem_seg == 3]))
    with pytest.raises(KeyError, match="instances"):
        model([{"image": _image(2, 3)}])


def test_semantic_inference_is_resized_to_the_requested_output():
    model = _model().eval()
    with torch.no_grad():
        out = model([{"image": _image(32, 48), "height": 64, "width": 96}, {"image": _image(32, 40)}])
    assert out[0]["sem_seg"].shape == (3, 64, 96) and out[1]["sem_seg"].shape == (3, 32, 40)
    labels = out[0]["sem_seg"].argmax(0)
    # Masks cover the left / right half of the padded 32x48 batch; image 0 fills it exactly.
    assert (labels[:, :40] == 2).all() and (labels[:, 56:] == 0).all()
    assert "instances" not in out[0] and "panoptic_seg" not in out[0]


def test_instance_and_panoptic_outputs_come_at_the_output_size():
    meta = MetadataCatalog.get("test_mask_former_meta_arch_things")
    meta.set(thing_dataset_id_to_contiguous_id={1: 2})
    model = _model(instance_on=True, panoptic_on=True, semantic_on=False,
                   sem_seg_postprocess_before_inference=True, metadata=meta).eval()
    with torch.no_grad():
        out = model([{"image": _image(32, 48), "height": 16, "width": 24}])[0]
    inst = out["instances"]
    assert inst.image_size == (16, 24) and inst.pred_masks.shape[-2:] == (16, 24)
    assert (inst.pred_classes == 2).all()  # panoptic models report things only
    seg, info = out["panoptic_seg"]
    assert seg.shape == (16, 24) and [s["category_id"] for s in info] == [2, 0]
    MetadataCatalog.remove("test_mask_former_meta_arch_things")


def test_flag_checks_are_clear():
    with pytest.raises(ValueError, match="SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE"):
        _model(semantic_on=False, instance_on=True, sem_seg_postprocess_before_inference=False)
    with pytest.raises(ValueError, match="thing_dataset_id_to_contiguous_id"):
        _model(panoptic_on=True, sem_seg_postprocess_before_inference=True)


def test_task_variants_fix_the_test_flags():
    opts = RANDOM_INIT + ["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True"]
    semantic = build_model(load_config(DEMO_INSTANCE, opts + ["MODEL.META_ARCHITECTURE", "Mask2FormerSemantic"]))
    assert type(semantic) is Mask2FormerSemantic
    assert (semantic.semantic_on, semantic.instance_on, semantic.sem_seg_postprocess_before_inference) == (True, False, False)
    instance = build_model(load_config(DEMO_SEMANTIC, opts + ["MODEL.META_ARCHITECTURE", "Mask2FormerInstance"]))
    assert type(instance) is Mask2FormerInstance
    assert (instance.semantic_on, instance.instance_on, instance.sem_seg_postprocess_before_inference) == (False, True, True)
    assert semantic.state_dict().keys() == build_model(load_config(DEMO_INSTANCE, RANDOM_INIT)).state_dict().keys()


# --- the demo-sized model, end to end -------------------------------------------------------------------


def _first_images(cfg, name, n, is_train):
    mapper = build_mapper(cfg, is_train=is_train)
    return [mapper(d) for d in DatasetCatalog.get(name)[:n]]


def test_demo_instance_model_trains_and_predicts_instances():
    cfg = load_config(DEMO_INSTANCE, RANDOM_INIT)
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(cfg)
    mapper = build_mapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("demo_city_labeled_instance")[1:3]]  # image 0 has no things
    assert all(len(x["instances"]) for x in batch)
    losses = model(batch)
    assert len(losses) == 3 * cfg.MODEL.MASK_FORMER.DEC_LAYERS
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    empty = Instances((128, 256))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    empty.gt_masks = torch.zeros(0, 128, 256, dtype=torch.bool)
    losses = model([{"image": batch[0]["image"], "instances": empty}])  # e.g. every object cropped away
    assert torch.isfinite(sum(losses.values())) and losses["loss_mask"] == 0
    model.eval()
    with torch.no_grad():
        (out,) = model(_first_images(cfg, "demo_city_val_instance", 1, is_train=False))
    inst = out["instances"]
    assert inst.image_size == (128, 256) and len(inst) == 30 * 3  # every (query, class) pair: 90 < 100
    assert inst.pred_classes.max() < 3 and (inst.scores >= 0).all() and (inst.scores <= 1).all()


def _miou(model, images, labels, num_classes):
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    model.train()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for out, label in zip(outputs, labels):
        pred = out["sem_seg"].argmax(0)
        valid = label != 255
        confusion += torch.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes ** 2).view(
            num_classes, num_classes)
    iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).clamp(min=1)
    return 100 * iou[confusion.sum(1) > 0].mean().item()


@pytest.mark.slow
def test_demo_semantic_model_overfits_four_images():
    # Half-size images (64x128), no augmentation: the four images are the whole training set.
    cfg = load_config(DEMO_SEMANTIC, [
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.CROP.ENABLED", "False",
        "INPUT.RANDOM_FLIP", "none", "SOLVER.BASE_LR", "0.001", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024",
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    dicts = DatasetCatalog.get("demo_city_labeled_sem_seg")[:4]
    batch = [build_mapper(cfg, is_train=True)(d) for d in dicts]
    images = [build_mapper(cfg, is_train=False)(d) for d in dicts]
    labels = [torch.as_tensor(read_sem_seg(d["sem_seg_file_name"], 10).astype(np.int64)) for d in dicts]
    optimizer = build_optimizer(cfg, model)
    start = _miou(model, images, labels, 10)
    for _ in range(120):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = _miou(model, images, labels, 10)
    assert start < 20 and end > 55 and end > start + 40, (start, end)


def test_trainer_trains_the_demo_configs_and_evaluates_mask_ap(tmp_path, new_name):
    from selftrain_d2.engine import Trainer

    fast = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024", *RANDOM_INIT]
    semantic = load_config(DEMO_SEMANTIC, fast + ["DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "sem")])
    trainer = Trainer(semantic)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.iter == 2 and (tmp_path / "sem" / "model_final.pth").exists()

    # Mask AP on four validation images (Detectron2's COCOEvaluator, ground truth from the dicts).
    val = new_name("demo_val4")
    DatasetCatalog.register(val, lambda: DatasetCatalog.get("demo_city_val_instance")[:4])
    source = MetadataCatalog.get("demo_city_val_instance")
    MetadataCatalog.get(val).set(thing_classes=source.thing_classes, evaluator_type="coco",
                                 thing_dataset_id_to_contiguous_id=source.thing_dataset_id_to_contiguous_id)
    instance = load_config(DEMO_INSTANCE, fast + ["DATASETS.TEST", f"('{val}',)", "OUTPUT_DIR", str(tmp_path / "ins")])
    trainer = Trainer(instance)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert 0 <= results["segm"]["AP"] <= 100 and "bbox" in results


def test_instance_only_inference_equals_upsampling_every_query():
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    model = _model(instance_on=True, semantic_on=False, sem_seg_postprocess_before_inference=True,
                   test_topk_per_image=5).eval()
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 3, 4, generator=g), "pred_masks": torch.randn(2, 3, 8, 12, generator=g)}
    inputs = [{"image": _image(32, 48), "height": 20, "width": 30}, {"image": _image(28, 40)}]
    images = model.preprocess_image(inputs)
    fast = model.inference(outputs, inputs, images)
    every = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
    for i, (x, size) in enumerate(zip(inputs, images.image_sizes)):
        masks = sem_seg_postprocess(every[i], size, x.get("height", size[0]), x.get("width", size[1]))
        expected = instance_inference(outputs["pred_logits"][i], masks, 3, topk=5)
        got = fast[i]["instances"]
        assert got.image_size == expected.image_size
        for field in ("pred_masks", "scores", "pred_classes"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
        assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)


@pytest.mark.parametrize("out_size", [(20, 30), (28, 40)])
def test_crop_and_resize_equals_detectron2_sem_seg_postprocess(out_size):
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    from selftrain_d2.modeling.meta_arch.postprocess import crop_and_resize

    masks = torch.randn(5, 32, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(crop_and_resize(masks, (28, 40), *out_size), sem_seg_postprocess(masks, (28, 40), *out_size))
