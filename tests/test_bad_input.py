"""Hostile and unlucky input (issue 23): unsafe YAML, _BASE_ cycles, out-of-range evaluation labels, high-depth
images and label maps, DeepLabV3+ at another test size, duplicate recipe stages, COCO annotations without a mask,
an all-failed sweep and temporary files left by a kill. Each gives a clear error, an exit code or a fix."""
import importlib.util
import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset
from detectron2.modeling import META_ARCH_REGISTRY
from PIL import Image

from selftrain_d2.config import get_selftrain_cfg, load_config
from selftrain_d2.data import build_mapper, build_test_loader
from selftrain_d2.data.image_io import LabelValueError, UnreadableImageError, read_image, read_sem_seg
from selftrain_d2.evaluation import build_evaluator
from selftrain_d2.modeling import build_model
from selftrain_d2.pseudo_labels import generate_pseudo_labels, register_teacher_output
from selftrain_d2.orchestration.recipe.spec import RecipeError, load_recipe

from .conftest import DEMO_CONFIG, ROOT

NO_DOWNLOAD = ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]
SMALL_HEAD = ["MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16",
              "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", "[8]"]


# ------------------------------------------------------------------------------------------------ configs

def _evil(tmp_path, name="evil.yaml"):
    """A config whose SOLVER.MAX_ITER, loaded unsafely, creates a marker file (and is 0)."""
    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_text(f'SOLVER:\n  MAX_ITER: !!python/object/apply:os.system ["touch {marker}"]\n')
    return path, marker


def test_unsafe_yaml_tag_is_refused_and_runs_nothing(tmp_path):
    evil, marker = _evil(tmp_path)
    with pytest.raises(ValueError) as e:
        load_config(str(evil))
    assert str(evil) in str(e.value) and "!!python/object/apply:os.system" in str(e.value)
    # The same as the _BASE_ of a harmless-looking leaf.
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text('_BASE_: "evil.yaml"\nSOLVER:\n  BASE_LR: 0.1\n')
    with pytest.raises(ValueError) as e:
        load_config(str(leaf))
    assert str(evil) in str(e.value) and "python/object/apply" in str(e.value)
    assert not marker.exists()


def test_self_and_cyclic_base_name_the_chain(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text('_BASE_: "own.yaml"\nSOLVER:\n  MAX_ITER: 3\n')
    with pytest.raises(ValueError, match="_BASE_ cycle") as e:
        load_config(str(own))
    assert str(e.value).count("own.yaml") == 2
    (tmp_path / "a.yaml").write_text('_BASE_: "b.yaml"\n')
    (tmp_path / "b.yaml").write_text(f'_BASE_: ["{DEMO_CONFIG}", "a.yaml"]\n')
    with pytest.raises(ValueError, match="_BASE_ cycle") as e:
        load_config(str(tmp_path / "a.yaml"))
    assert f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}" in str(e.value)


def test_duplicate_recipe_stage_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: twice\nstages:\n"
        "  teacher: {type: train, config: a.yaml}\n"
        "  teacher: {type: train, config: b.yaml}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe))
    assert str(recipe) in str(e.value) and "'teacher'" in str(e.value) and "line 3" in str(e.value)


def test_unsafe_tag_in_recipe_is_refused(tmp_path):
    marker = tmp_path / "marker"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nstages: {{}}\n')
    with pytest.raises(RecipeError, match="python/object/apply"):
        load_recipe(str(recipe))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ evaluation

CLASSES = [f"c{i}" for i in range(10)]


def _register_sem_seg(name, records, classes=CLASSES):
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=255, evaluator_type="sem_seg")


def _val_set(tmp_path, patch_value):
    """One 60x60 image whose label is class 0 everywhere and ``patch_value`` in a 30x30 corner."""
    label = np.zeros((60, 60), np.uint8)
    label[:30, :30] = patch_value
    Image.fromarray(label).save(tmp_path / f"gt{patch_value}.png")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "img.png")
    return [{"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / f"gt{patch_value}.png"),
             "height": 60, "width": 60}]


def _evaluate(evaluator, name, prediction):
    evaluator.reset()
    scores = torch.nn.functional.one_hot(torch.as_tensor(prediction), len(CLASSES)).permute(2, 0, 1).float()
    evaluator.process(DatasetCatalog.get(name), [{"sem_seg": scores}])
    return evaluator.evaluate()["sem_seg"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_out_of_range_evaluation_labels(tmp_path, new_name):
    bad, clean = new_name("bad"), new_name("clean")
    _register_sem_seg(bad, _val_set(tmp_path, 50))
    _register_sem_seg(clean, _val_set(tmp_path, 255))  # the same pixels as ignore
    prediction = np.zeros((60, 60), np.int64)
    prediction[:30, :30] = 3
    want = _evaluate(SemSegEvaluator(clean, distributed=False), clean, prediction)
    # The premise: Detectron2's evaluator counts id 50 in another class's cell.
    assert _evaluate(SemSegEvaluator(bad, distributed=False), bad, prediction) != pytest.approx(want, nan_ok=True)

    cfg = get_selftrain_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    with pytest.raises(LabelValueError) as e:
        _evaluate(build_evaluator(cfg, bad), bad, prediction)
    assert "gt50.png" in str(e.value) and "[50]" in str(e.value)

    cfg.TEST.INVALID_LABEL_IDS = "ignore"
    handler = _Records()
    logging.getLogger("selftrain_d2.evaluation").addHandler(handler)
    try:
        assert _evaluate(build_evaluator(cfg, bad), bad, prediction) == pytest.approx(want, nan_ok=True)
    finally:
        logging.getLogger("selftrain_d2.evaluation").removeHandler(handler)
    assert len(handler.messages) == 1
    assert "900 ground-truth pixels in 1 label files hold ids [50]" in handler.messages[0]
    assert "gt50.png" in handler.messages[0]

    cfg.TEST.INVALID_LABEL_IDS = "skip"
    with pytest.raises(ValueError, match="TEST.INVALID_LABEL_IDS"):
        build_evaluator(cfg, bad)


# ------------------------------------------------------------------------------------------------ images

def test_16bit_png_image_is_scaled_to_8bit(tmp_path):
    grey = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 31 % 65536).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    want = np.round(grey / 257.0).astype(np.uint8)
    rgb = read_image(tmp_path / "grey16.png", "RGB")
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 50, 3)
    assert all(np.array_equal(rgb[..., c], want) for c in range(3))
    assert np.array_equal(read_image(tmp_path / "grey16.png", "L")[..., 0], want)
    # A floating-point TIFF has no known range: refused, with the file named.
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(UnreadableImageError, match="float.tif"):
        read_image(tmp_path / "float.tif", "BGR")


def test_16bit_label_png_keeps_its_ids(tmp_path):
    label = np.zeros((40, 60), np.uint16)
    label[:, 20:] = 2
    label[0] = 255
    Image.fromarray(label).save(tmp_path / "label16.png")
    assert Image.open(tmp_path / "label16.png").mode.startswith("I;16")
    assert np.array_equal(read_sem_seg(tmp_path / "label16.png", 3), label)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img.png")
    record = {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / "label16.png"),
              "height": 40, "width": 60}
    out = build_mapper(load_config(DEMO_CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(80,)", "INPUT.CROP.ENABLED", "False"]),
                       is_train=True)(record)  # resized: Detectron2's resize cannot take a 16-bit map
    assert set(out["sem_seg"].unique().tolist()) == {0, 2, 255}
    # An id above 255 is an id, not a scaled value.
    label[5, 5] = 300
    Image.fromarray(label).save(tmp_path / "label16.png")
    with pytest.raises(LabelValueError, match=r"label16.png holds ids \[300\]"):
        read_sem_seg(tmp_path / "label16.png", 3)


# ------------------------------------------------------------------------------------------------ DeepLabV3+

def test_square_crop_deeplab_evaluates_at_another_test_size(tmp_path, new_name):
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate([(96, 160), (80, 80), (72, 130)]):  # test short side 96: 96x160, 96x96, 96x173
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(tmp_path / f"{i}_gt.png")
        records.append({"file_name": str(tmp_path / f"{i}.png"), "sem_seg_file_name": str(tmp_path / f"{i}_gt.png"),
                        "height": h, "width": w, "image_id": i})
    name = new_name("deeplab_val")
    _register_sem_seg(name, records)
    sizes = ["INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "96"]
    cfg = load_config(DEMO_CONFIG, NO_DOWNLOAD + SMALL_HEAD + sizes + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "out")])
    model = build_model(cfg).eval()
    results = inference_on_dataset(model, build_test_loader(cfg, name), build_evaluator(cfg, name))
    assert 0 <= results["sem_seg"]["mIoU"] <= 100

    # Detectron2's fixed-pool head is refused before training, with the reason and the fix.
    with pytest.raises(ValueError) as e:
        load_config(DEMO_CONFIG, NO_DOWNLOAD + sizes + ["MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHead"])
    assert "INPUT.MIN_SIZE_TEST 96" in str(e.value) and "DeepLabV3PlusGlobalPoolHead" in str(e.value)
    # Its weights load into the default head unchanged.
    fixed = load_config(DEMO_CONFIG, NO_DOWNLOAD + SMALL_HEAD + ["MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHead",
                                                                 "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3",
                                                                 "INPUT.MIN_SIZE_TRAIN", "(128,)"])
    model.load_state_dict(build_model(fixed).state_dict(), strict=True)


def test_every_deeplab_config_pools_globally():
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        for f in files:
            path = os.path.join(folder, f)
            with open(path) as fh:
                if not f.endswith(".yaml") or "stages:" in fh.read():
                    continue
            cfg = load_config(path)
            if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
                assert cfg.MODEL.SEM_SEG_HEAD.NAME == "DeepLabV3PlusGlobalPoolHead", path


# ------------------------------------------------------------------------------------------------ COCO

def test_coco_annotation_without_segmentation_names_file_image_and_id(tmp_path, new_name):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "scene.png")
    polygon = [[5.0, 5.0, 20.0, 5.0, 20.0, 20.0, 5.0, 20.0]]
    coco = {
        "images": [{"id": 3, "file_name": "scene.png", "height": 40, "width": 50}],
        "annotations": [
            {"id": 11, "image_id": 3, "category_id": 1, "bbox": [5, 5, 15, 15], "area": 225, "iscrowd": 0,
             "segmentation": polygon},
            {"id": 12, "image_id": 3, "category_id": 1, "bbox": [25, 5, 10, 10], "area": 100, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    name = new_name("coco")
    register_coco_instances(name, {}, str(tmp_path / "instances.json"), str(tmp_path))
    cfg = load_config(DEMO_CONFIG, ["INPUT.DATASET_MAPPER_NAME", "mask_former_instance", "INPUT.CROP.ENABLED", "False",
                                    "INPUT.MIN_SIZE_TRAIN", "(40,)"])
    with pytest.raises(KeyError) as e:
        build_mapper(cfg, is_train=True)(DatasetCatalog.get(name)[0])
    msg = str(e.value)
    assert str(tmp_path / "instances.json") in msg and str(tmp_path / "scene.png") in msg and "[12]" in msg


# ------------------------------------------------------------------------------------------------ sweep

def test_sweep_exits_non_zero_when_every_trial_failed(tmp_path):
    spec = importlib.util.spec_from_file_location("sweep_all_failed", os.path.join(ROOT, "selftrain_d2", "orchestration", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def failing(config, overrides, output_dir, num_gpus=1, **dist):
        raise sweep.TrialFailed("boom")

    sweep.run_trial = failing
    (tmp_path / "sweep.yaml").write_text(
        "name: t\nconfigs: {student: student.yaml}\nstages:\n  - name: lr\n    config: student\n"
        "    grid: {SOLVER.BASE_LR: [0.01, 0.02]}\n")
    with pytest.raises(SystemExit) as e:
        sweep.run(["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / "out")])
    assert e.value.code == 1


# ------------------------------------------------------------------------------------------------ pseudo labels

class _HalfTeacher(torch.nn.Module):
    """3 class scores per pixel from the image; like a fixed-pool DeepLab, refuses inputs that are not 1:2."""

    def __init__(self, cfg=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            h, w = x["image"].shape[-2:]
            if w != 2 * h:
                raise ValueError(f"`pool_kernel_size` must be divisible by the shape of inputs. Input size: {(h, w)}")
            outputs.append({"sem_seg": (x["image"].float() + 1) * self.scale})
        return outputs


if "_HalfTeacher" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(_HalfTeacher)
register_teacher_output("_HalfTeacher", "semantic", "scores")


def _pseudo_cfg(*opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "_HalfTeacher", "MODEL.DEVICE", "cpu", "INPUT.FORMAT", "RGB",
                         "INPUT.MIN_SIZE_TEST", "0", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", *opts])
    return cfg


def test_stale_temporary_files_are_removed_on_the_next_run(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png"):
        Image.fromarray(np.full((4, 8, 3), 9, np.uint8)).save(images / rel)
    out = tmp_path / "out"
    cfg = _pseudo_cfg("OFFLINE_PSEUDO_LABELS.FORMAT", "soft")
    generate_pseudo_labels(cfg, str(images), out, model=_HalfTeacher())
    # What a kill during np.savez_compressed (or any other atomic write) leaves behind.
    stale = [out / "soft" / ".a.npz.k2j4h1.tmp", out / "soft" / "sub" / ".b.npz.x9f0aa.tmp",
             out / ".dataset.json.q1w2e3.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    report = generate_pseudo_labels(cfg, str(images), out, model=_HalfTeacher())
    assert report["already_done"] == 2 and not any(p.exists() for p in stale)
    assert (out / "soft" / "a.npz").is_file() and (out / "soft" / "sub" / "b.npz").is_file()


def test_pseudo_labelling_error_names_the_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(images / "a_wide.png")
    Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(images / "b_odd.png")
    with pytest.raises(RuntimeError) as e:
        generate_pseudo_labels(_pseudo_cfg(), str(images), tmp_path / "out", model=_HalfTeacher())
    assert str(images / "b_odd.png") in str(e.value) and "pool_kernel_size" in str(e.value)
