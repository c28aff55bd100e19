import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.modeling.transformer_decoder.masked_attention_decoder import masked_attention_mask

from ..conftest import ROOT

REFERENCE = os.path.join(ROOT, "tests", "assets", "reference")
R50_SHAPES = {
    "res2": ShapeSpec(channels=256, stride=4),
    "res3": ShapeSpec(channels=512, stride=8),
    "res4": ShapeSpec(channels=1024, stride=16),
    "res5": ShapeSpec(channels=2048, stride=32),
}
SMALL = {  # small dims for CPU training tests
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32, "MODEL.SEM_SEG_HEAD.MASK_DIM": 32, "MODEL.MASK_FORMER.HIDDEN_DIM": 32,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 64, "MODEL.MASK_FORMER.NHEADS": 4, "MODEL.MASK_FORMER.DEC_LAYERS": 4,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 6, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
}


def coco_instance_r50_cfg(overrides=None):
    """Our defaults + the head settings of the reference configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml."""
    cfg = get_selftrain_cfg()
    head = cfg.MODEL.SEM_SEG_HEAD
    head.NAME = "MaskFormerHead"
    head.NUM_CLASSES = 80
    head.IGNORE_VALUE = 255
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.COMMON_STRIDE = 4
    head.TRANSFORMER_ENC_LAYERS = 6
    head.CONVS_DIM = 256
    head.MASK_DIM = 256
    head.NORM = "GN"
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    mf = cfg.MODEL.MASK_FORMER
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.DEEP_SUPERVISION = True
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.PRE_NORM = False
    mf.ENFORCE_INPUT_PROJ = False
    mf.SIZE_DIVISIBILITY = 32
    mf.DEC_LAYERS = 10
    for key, value in (overrides or {}).items():
        cfg.merge_from_list([key, str(value)])
    return cfg


def build_head(cfg):
    return SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(cfg, R50_SHAPES)


def r50_features(batch=2, height=64, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, s.channels, height // s.stride, width // s.stride, generator=g)
            for k, s in R50_SHAPES.items()}


def _max_abs(a, b):
    return (a - b).abs().max().item()


def test_head_reproduces_the_reference_outputs():
    ref = torch.load(os.path.join(REFERENCE, "mask2former-head-small.pt"), weights_only=True)
    head = build_head(coco_instance_r50_cfg(ref["overrides"]))
    head.load_state_dict(ref["state_dict"], strict=True)
    head.eval()
    with torch.no_grad():
        out = head(ref["features"])

    expected = ref["outputs"]
    pairs = [("final", out, expected)] + [
        (f"aux {i}", a, b) for i, (a, b) in enumerate(zip(out["aux_outputs"], expected["aux_outputs"]))]
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"]) == 3
    diffs = {}
    for name, got, want in pairs:
        for key in ("pred_logits", "pred_masks"):
            assert got[key].shape == want[key].shape, (name, key)
            diffs[f"{name} {key}"] = _max_abs(got[key], want[key])
            tol = 1e-4 * max(1.0, want[key].abs().max().item())
            assert diffs[f"{name} {key}"] <= tol, (name, key, diffs)
    print("max abs differences:", diffs)


def _reference_keys(tsv):
    keys = {}
    with open(os.path.join(REFERENCE, tsv)) as f:
        for line in f:
            if line.startswith("sem_seg_head."):
                key, shape = line.rstrip("\n").split("\t")
                keys[key[len("sem_seg_head."):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


@pytest.mark.parametrize("tsv, overrides", [
    ("mask2former-coco-instance-R50-state-dict.tsv", {}),
    # The Cityscapes semantic config differs in its head only by the number of classes.
    ("mask2former-cityscapes-semantic-R50-state-dict.tsv", {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19}),
])
def test_full_size_head_state_dict_matches_the_reference_checkpoint(tsv, overrides):
    head = build_head(coco_instance_r50_cfg(overrides))
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected = _reference_keys(tsv)
    assert len(expected) > 200
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_head_trains_on_cpu_with_finite_gradients():
    torch.manual_seed(0)
    head = build_head(coco_instance_r50_cfg({**SMALL, "MODEL.MASK_FORMER.DROPOUT": 0.1})).train()
    features = {k: v.requires_grad_(True) for k, v in r50_features().items()}
    out = head(features)
    assert out["pred_logits"].shape == (2, 6, 81)
    assert out["pred_masks"].shape == (2, 6, 16, 24)
    assert len(out["aux_outputs"]) == 3
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
    loss = loss + sum(a["pred_masks"].square().mean() for a in out["aux_outputs"])
    loss.backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert all(torch.isfinite(f.grad).all() for f in features.values())
    # The deformable attention's offsets and the masked cross-attention both learn.
    assert grads["pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].abs().sum() > 0
    assert grads["predictor.transformer_cross_attention_layers.0.multihead_attn.in_proj_weight"].abs().sum() > 0


def test_masked_attention_mask_thresholds_and_unmasks_empty_rows():
    logits = torch.full((1, 2, 4, 4), -3.0)
    logits[0, 0, :2, :2] = 3.0  # query 0: the top-left quarter; query 1: empty
    mask = masked_attention_mask(logits, (2, 2), num_heads=3)
    assert mask.shape == (3, 2, 4) and mask.dtype == torch.bool
    assert mask[:, 0].tolist() == [[False, True, True, True]] * 3
    assert not mask[:, 1].any()  # an empty mask attends everywhere


def test_mask_former_head_rejects_other_transformer_inputs():
    with pytest.raises(ValueError, match="TRANSFORMER_IN_FEATURE"):
        build_head(coco_instance_r50_cfg({**SMALL, "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "res5"}))
