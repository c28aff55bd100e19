"""Soft pseudo labels in training (self-training paper, appendix A.1): the stored top-k probabilities follow the
image through the mapper's resize, crop and flip, and the per-pixel models train on them with a soft
cross-entropy, masked where the stored mass is below the threshold."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.projects.deeplab.loss import DeepLabCE
from PIL import Image

from selftrain_d2.config import load_config
from selftrain_d2.data import build_mapper
from selftrain_d2.data.build import build_train_loader
from selftrain_d2.data.mappers.semantic import decode_pixel_index, pixel_index_map
from selftrain_d2.modeling.dense_loss import SoftTargets, dense_cross_entropy, padded_soft_targets
from selftrain_d2.pseudo_labels.storage import write_soft_label

from ..conftest import DEMO_CONFIG

IGNORE = 255


def _soft(classes, probs):
    return SoftTargets(torch.tensor(classes), torch.tensor(probs, dtype=torch.float32),
                       torch.tensor([True] * len(classes)))


def test_soft_cross_entropy_by_hand():
    # One image, 3 classes, 1x3 pixels; the last pixel is ignored.
    logits = torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 0.0]], [[-1.0, 0.5, 0.0]]]])
    labels = torch.tensor([[[0, 1, IGNORE]]])
    soft = _soft([[[[0, 2, 1]], [[1, 1, 0]]]], [[[[0.75, 0.5, 0.9]], [[0.25, 0.5, 0.1]]]])

    def log_p(x, c):  # log softmax of pixel x at class c, by hand
        column = [logits[0, k, 0, x].item() for k in range(3)]
        return column[c] - math.log(sum(math.exp(v) for v in column))

    pixel0 = -(0.75 * log_p(0, 0) + 0.25 * log_p(0, 1))
    pixel1 = -(0.5 * log_p(1, 2) + 0.5 * log_p(1, 1))
    assert dense_cross_entropy(logits, labels, IGNORE, soft).item() == pytest.approx((pixel0 + pixel1) / 2)
    # DeepLab's hard pixel mining: the largest int(share x all pixels) losses, ignored ones counting 0.
    assert dense_cross_entropy(logits, labels, IGNORE, soft, 0.34).item() == pytest.approx(max(pixel0, pixel1))
    assert dense_cross_entropy(logits, labels, IGNORE, soft, 1.0).item() == pytest.approx((pixel0 + pixel1) / 3)
    # A hard image beside it keeps its plain cross-entropy.
    mixed = SoftTargets(soft.classes.repeat(2, 1, 1, 1), soft.probs.repeat(2, 1, 1, 1), torch.tensor([True, False]))
    both = dense_cross_entropy(logits.repeat(2, 1, 1, 1), labels.repeat(2, 1, 1), IGNORE, mixed)
    assert both.item() == pytest.approx((pixel0 + pixel1 - log_p(0, 0) - log_p(1, 1)) / 4)


def test_without_soft_targets_the_models_own_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 6, 7), torch.randint(0, 5, (2, 6, 7))
    labels[0, :2] = IGNORE
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert dense_cross_entropy(logits, labels, IGNORE).item() == pytest.approx(ce.item(), rel=1e-6)
    ohem = DeepLabCE(ignore_label=IGNORE, top_k_percent_pixels=0.2)(logits, labels)
    assert dense_cross_entropy(logits, labels, IGNORE, top_k_percent=0.2).item() == pytest.approx(ohem.item(), rel=1e-6)
    # One-hot soft targets are the hard ones.
    one_hot = SoftTargets(labels.clamp(max=4).unsqueeze(1), torch.ones(2, 1, 6, 7), torch.tensor([True, True]))
    assert dense_cross_entropy(logits, labels, IGNORE, one_hot).item() == pytest.approx(ce.item(), rel=1e-6)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def _coordinate_sample(tmp_path, h=8, w=12):
    """Image: red = 20 x row, green = 20 x column. Soft label, 3 classes, top-2: classes (x % 3, (x + 1) % 3)
    with probabilities (0.5 + 0.04 y, 0.2), mass 0.7 + 0.04 y. Hard label: the top class, (0, 0) ignored."""
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([yy * 20, xx * 20, np.zeros_like(yy)], -1).astype(np.uint8)
    classes = np.stack([xx % 3, (xx + 1) % 3]).astype(np.uint8)
    probs = np.zeros((3, h, w), np.float32)
    np.put_along_axis(probs, classes.astype(np.int64), np.stack([0.5 + 0.04 * yy, np.full((h, w), 0.2)]), axis=0)
    write_soft_label(tmp_path / "soft.npz", probs, top_k=2)
    label = classes[0].copy()
    label[0, 0] = IGNORE
    return {"file_name": _png(tmp_path / "image.png", image), "sem_seg_file_name": _png(tmp_path / "label.png", label),
            "soft_label_file_name": str(tmp_path / "soft.npz"), "use_soft_label": True, "height": h, "width": w}


def _mapper(*opts):
    cfg = load_config(DEMO_CONFIG, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "DATALOADER.DECODE_CACHE_MB", "0", *opts])
    return build_mapper(cfg, is_train=True)


def test_soft_label_loss_by_hand_after_crop_and_flip(tmp_path):
    record = dict(_coordinate_sample(tmp_path), crop_center=(4, 6))
    mapper = _mapper("INPUT.MIN_SIZE_TRAIN", "(8,)", "INPUT.CROP.SIZE", "(4, 6)", "INPUT.RANDOM_FLIP", "horizontal",
                     "DATALOADER.CENTROID_SAMPLING.JITTER", "0.0", "DATALOADER.SOFT_LABEL_MIN_MASS", "0.8")
    for seed in range(20):  # a seed whose draw flips the crop
        np.random.seed(seed)
        out = mapper(record)
        if out["image"][1, 0, 0] > out["image"][1, 0, -1]:
            break
    else:
        pytest.fail("no seed flipped the image")
    # The crop around (4, 6) is rows 2..5 and columns 3..8; flipped, output column j is source column 8 - j.
    rows, cols = np.arange(2, 6), 8 - np.arange(6)
    assert out["image"][0, :, 0].tolist() == (rows * 20).tolist() and out["image"][1, 0].tolist() == (cols * 20).tolist()
    assert out["sem_seg_soft_classes"].shape == out["sem_seg_soft_probs"].shape == (2, 4, 6)

    logits = torch.linspace(-2, 2, 3 * 4 * 6).reshape(1, 3, 4, 6).sin() * 3
    total, count = 0.0, 0
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            mass = 0.7 + 0.04 * y
            if mass < 0.8:  # row 2 (mass 0.78): masked
                assert out["sem_seg"][i, j] == IGNORE
                continue
            assert out["sem_seg"][i, j] == x % 3
            column = logits[0, :, i, j].tolist()
            log_norm = math.log(sum(math.exp(v) for v in column))
            expected = [((x % 3), (0.5 + 0.04 * y) / mass), ((x + 1) % 3, 0.2 / mass)]
            assert [(int(c), pytest.approx(float(p), abs=1e-3)) for c, p in
                    zip(out["sem_seg_soft_classes"][:, i, j], out["sem_seg_soft_probs"][:, i, j])] == expected
            total += -sum(p * (column[c] - log_norm) for c, p in expected)
            count += 1
    soft = padded_soft_targets([out], 0, "cpu")
    loss = dense_cross_entropy(logits, out["sem_seg"][None], IGNORE, soft)
    assert count == 18 and loss.item() == pytest.approx(total / count, rel=2e-3)  # float16 storage


def test_soft_label_follows_the_label_map_through_resize_crop_and_flip(tmp_path):
    """Each pixel's soft top class is its hard label, whatever the resize (nearest, like the labels)."""
    rng = np.random.default_rng(0)
    h, w = 37, 53
    label = rng.integers(0, 10, (h, w)).astype(np.uint8)
    probs = rng.uniform(0, 0.05, (10, h, w)).astype(np.float32)
    np.put_along_axis(probs, label[None].astype(np.int64), 0.9, axis=0)
    write_soft_label(tmp_path / "soft.npz", probs, top_k=3)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    record = {"file_name": _png(tmp_path / "image.png", image), "sem_seg_file_name": _png(tmp_path / "l.png", label),
              "soft_label_file_name": str(tmp_path / "soft.npz"), "use_soft_label": True, "height": h, "width": w}
    mapper = _mapper("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "10", "INPUT.MIN_SIZE_TRAIN", "(29, 50, 71, 90)",
                     "INPUT.CROP.SIZE", "(24, 40)")
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(record)
        assert torch.equal(out["sem_seg_soft_classes"][0].long(), out["sem_seg"])
        assert torch.allclose(out["sem_seg_soft_probs"].sum(0), torch.ones(24, 40))
    assert "sem_seg_soft_probs" not in mapper(dict(record, use_soft_label=False))  # hard training on the same files


def test_pixel_index_map_round_trip():
    index = pixel_index_map(3, 5)
    assert index.shape == (3, 5, 3) and decode_pixel_index(index).tolist() == np.arange(15).reshape(3, 5).tolist()
    assert decode_pixel_index(index[:, ::-1]).tolist() == np.arange(15).reshape(3, 5)[:, ::-1].tolist()


def _register(name, tmp_path, soft=True):
    sample = _coordinate_sample(tmp_path)
    sample.pop("use_soft_label")
    if not soft:
        sample.pop("soft_label_file_name")
    DatasetCatalog.register(name, lambda: [dict(sample, image_id=i) for i in range(4)])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=IGNORE)


def _loader_cfg(real, pseudo, *opts):
    return load_config(DEMO_CONFIG, [
        "DATASETS.TRAIN", f"('{real}',)", "DATASETS.TRAIN_PSEUDO", f"('{pseudo}',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "3", "INPUT.MIN_SIZE_TRAIN", "(8,)", "INPUT.CROP.SIZE", "(4, 6)", "SOLVER.IMS_PER_BATCH", "4", "SEED", "1",
        "DATALOADER.DECODE_CACHE_MB", "0", *opts])


def test_loader_trains_the_named_pseudo_datasets_on_soft_labels(tmp_path, new_name):
    real, pseudo, hard_only = new_name("real"), new_name("pseudo"), new_name("hard")
    _register(real, tmp_path, soft=False)
    _register(pseudo, tmp_path)
    _register(hard_only, tmp_path, soft=False)
    soft_arch = ["DATASETS.TRAIN_PSEUDO_SOFT", f"('{pseudo}',)", "MODEL.META_ARCHITECTURE", "SoftSemanticSegmentor"]
    epoch = [s for _, b in zip(range(2), build_train_loader(_loader_cfg(real, pseudo, *soft_arch))) for s in b]
    assert sorted("sem_seg_soft_probs" in s for s in epoch) == [False] * 4 + [True] * 4  # 4 real + 4 pseudo
    hard = [s for _, b in zip(range(2), build_train_loader(_loader_cfg(real, pseudo))) for s in b]
    assert not any("sem_seg_soft_probs" in s for s in hard)  # the same files, hard labels
    with pytest.raises(ValueError, match=r"TRAIN_PSEUDO_SOFT names \['other'\], which are not in"):
        build_train_loader(_loader_cfg(real, pseudo, "DATASETS.TRAIN_PSEUDO_SOFT", "('other',)"))
    with pytest.raises(ValueError, match=f"dataset '{hard_only}' has no soft labels for 4 images"):
        build_train_loader(_loader_cfg(real, hard_only, "DATASETS.TRAIN_PSEUDO_SOFT", f"('{hard_only}',)"))
    with pytest.raises(ValueError, match="META_ARCHITECTURE 'SemanticSegmentor' does not take them"):
        build_train_loader(_loader_cfg(real, pseudo, "DATASETS.TRAIN_PSEUDO_SOFT", f"('{pseudo}',)"))


def _inputs(soft_one_hot):
    """Two 32x64 inputs; with ``soft_one_hot`` the second carries its hard label as a one-hot soft label."""
    torch.manual_seed(3)
    inputs = [{"image": torch.randint(0, 255, (3, 32, 64), dtype=torch.uint8),
               "sem_seg": torch.randint(0, 3, (32, 64))} for _ in range(2)]
    inputs[1]["sem_seg"][:4] = IGNORE
    if soft_one_hot:
        inputs[1]["sem_seg_soft_classes"] = inputs[1]["sem_seg"].clamp(max=2).to(torch.uint8)[None]
        inputs[1]["sem_seg_soft_probs"] = torch.ones(1, 32, 64)
    return inputs


@pytest.mark.parametrize("arch", ["SoftSemanticSegmentor", "PSPNet", "FastSCNN"])
def test_every_per_pixel_model_trains_on_soft_labels(arch):
    """A one-hot soft label costs what its hard label does (same weights, same dropout draws), and a spread-out
    one changes the loss, in each model's own reduction (OHEM for DeepLabV3+, plus PSPNet's auxiliary head)."""
    opts = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
            "MODEL.META_ARCHITECTURE", arch]
    if arch == "PSPNet":
        opts += ["MODEL.PSPNET.HEAD_CHANNELS", "16", "MODEL.PSPNET.AUX_CHANNELS", "8",
                 "MODEL.EFFICIENTNET_LITE.OUT_FEATURES", "['res4', 'res5']"]
    model = build_model(load_config(DEMO_CONFIG, opts)).train()

    def losses(inputs):
        torch.manual_seed(0)
        return {k: v.item() for k, v in model(inputs).items()}

    hard = losses(_inputs(False))
    assert losses(_inputs(True)) == pytest.approx(hard, rel=1e-5)
    spread = _inputs(True)
    spread[1]["sem_seg_soft_classes"] = torch.stack([spread[1]["sem_seg_soft_classes"][0],
                                                     (spread[1]["sem_seg_soft_classes"][0] + 1) % 3])
    spread[1]["sem_seg_soft_probs"] = torch.full((2, 32, 64), 0.5)
    changed = losses(spread)
    assert changed.keys() == hard.keys() and all(changed[k] != pytest.approx(hard[k]) for k in hard)


def test_recipe_student_trains_on_the_named_stages_soft_labels(tmp_path):
    from selftrain_d2.orchestration.recipe import RecipeError, parse_recipe
    from selftrain_d2.orchestration.recipe.stages import STAGE_REGISTRY, RecipeContext

    def recipe(**student):
        stages = {
            "teacher": {"type": "train", "config": DEMO_CONFIG},
            "pseudo_labels": {"type": "pseudo_labels", "model": "teacher", "input": "demo_city_unlabeled_sem_seg"},
            "student": {"type": "train", "config": DEMO_CONFIG, "pseudo_labels": ["pseudo_labels"], **student},
        }
        return parse_recipe({"name": "r", "stages": stages}, str(tmp_path / "r.yaml"))

    def stage(r):
        ctx = RecipeContext(r, tmp_path / "out")
        ctx.results["pseudo_labels"] = {"dataset": "recipe_pseudo_labels", "dir": str(tmp_path / "pl")}
        return STAGE_REGISTRY.get("train")(r.stage("student"), ctx)

    soft, hard = stage(recipe(soft_labels=["pseudo_labels"])), stage(recipe())
    opts = soft._derived_opts()
    assert opts[opts.index("DATASETS.TRAIN_PSEUDO_SOFT") + 1] == "('recipe_pseudo_labels',)"
    assert "DATASETS.TRAIN_PSEUDO_SOFT" not in hard._derived_opts()
    assert soft.fingerprint() != hard.fingerprint()  # same config and inputs: soft or hard must rerun
    with pytest.raises(RecipeError, match=r"soft_labels \['teacher'\] must also be in its pseudo_labels"):
        recipe(soft_labels=["teacher"])
