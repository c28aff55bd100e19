"""Your own data: COCO JSON and image + label folders registered only through the config (DATASETS.COCO_INSTANCES,
SEM_SEG, SEM_SEG_FROM_COCO, HELDOUT, SELFTRAIN.IMPORTS) and the recipe's datasets:/imports: blocks, in every
process; the report's warnings and pictures; the README walkthrough, run on tiny settings."""
import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image

from selftrain_d2.config import get_selftrain_cfg, load_config
from selftrain_d2.data.datasets import register_from_cfg
from selftrain_d2.data.datasets.coco import rasterise_annotations
from selftrain_d2.data.datasets.heldout import heldout_labels
from selftrain_d2.data.datasets.splits import register_split, split_keys, write_split_file
from selftrain_d2.evaluation.label_statistics import log_training_set, pseudo_label_quality
from selftrain_d2.orchestration.recipe import RecipeError, parse_recipe
from selftrain_d2.orchestration.recipe.report import label_figure, never_predicted

from .conftest import DEMO_CONFIG, FAST_TRAIN_OPTS, ROOT

CPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
SHAPES = ["background", "disc", "box", "triangle"]
# DeepLabV3+ that trains on the tiny shapes in seconds, at any input size.
FAST_OPTS = FAST_TRAIN_OPTS + ["SOLVER.MAX_ITER", "2", "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
                               "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusGlobalPoolHead", "INPUT.MIN_SIZE_TEST", "64",
                               "INPUT.MIN_SIZE_TRAIN", "(64,)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"]


def _shapes_module():
    spec = importlib.util.spec_from_file_location("make_shapes_coco", os.path.join(ROOT, "datasets",
                                                                                    "make_shapes_coco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shapes(root, counts=(6, 6, 4)):
    """The walkthrough's synthetic COCO data (3 shape classes) under ``root``: ``{split: json}``, image root."""
    paths = _shapes_module().make_dataset(str(root), counts=counts, size=(64, 96))
    return paths, str(root / "images")


def _sem_seg_folder(root, coco_json, image_root):
    """A DATASETS.SEM_SEG folder made from a COCO file: img/<stem>.jpg beside gt/<stem>_mask.png, classes.txt."""
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    for record in load_coco_json(coco_json, image_root):
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        os.symlink(record["file_name"], root / "img" / f"{stem}.jpg")
        for a in record["annotations"]:
            a["category_id"] -= 1  # load_coco_json without a dataset name keeps the json's ids (1..3)
        label = rasterise_annotations(record["annotations"], record["height"], record["width"])
        Image.fromarray(label).save(root / "gt" / f"{stem}_mask.png")
    (root / "classes.txt").write_text("# shapes\n" + "\n".join(SHAPES) + "\n")
    return str(root / "img"), str(root / "gt"), str(root / "classes.txt")


def _cfg(*opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(list(opts))
    return cfg


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# ---- DATASETS.SEM_SEG ------------------------------------------------------------------------------------


def test_sem_seg_folder_pairs_labels_by_the_documented_suffix_rules(tmp_path, new_name):
    img, gt = tmp_path / "img", tmp_path / "gt"
    image = np.zeros((4, 6, 3), np.uint8)
    _png(img / "x.jpg", image)
    _png(img / "city" / "a_000001_leftImg8bit.png", image)
    _png(img / "z.png", image)
    _png(gt / "x.png", np.ones((4, 6)))
    _png(gt / "city" / "a_000001_gtFine_labelTrainIds.png", np.zeros((4, 6)))
    _png(gt / "city" / "a_000001_gtFine_labelIds.png", np.zeros((4, 6)))  # not a rule: ignored
    _png(gt / "z_mask.png", np.zeros((4, 6)))
    (tmp_path / "classes.txt").write_text("# two classes\nroad\n\ncar\n")
    name = new_name("semseg")
    assert register_from_cfg(_cfg("DATASETS.SEM_SEG", repr([[name, str(img), str(gt), str(tmp_path / "classes.txt")]])))
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == ["road", "car"] and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    pairs = {r["image_id"]: os.path.relpath(r["sem_seg_file_name"], gt) for r in DatasetCatalog.get(name)}
    assert pairs == {"x": "x.png", "z": "z_mask.png",
                     "city/a_000001_leftImg8bit": "city/a_000001_gtFine_labelTrainIds.png"}

    _png(gt / "x_mask.png", np.ones((4, 6)))  # a second candidate for x.jpg
    with pytest.raises(ValueError, match=r"(?s)more than one label map.*x.jpg: x.png and x_mask.png"):
        DatasetCatalog.get(name)
    os.remove(gt / "x_mask.png")
    os.remove(gt / "x.png")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images.*no label map(.|\n)*x.jpg(.|\n)*'_mask'"):
        DatasetCatalog.get(name)


def test_sem_seg_folder_with_images_and_labels_in_one_folder(tmp_path, new_name):
    _png(tmp_path / "d" / "a.jpg", np.zeros((4, 4, 3)))
    _png(tmp_path / "d" / "a_mask.png", np.ones((4, 4)))
    _png(tmp_path / "d" / "b.png", np.zeros((4, 4, 3)))
    _png(tmp_path / "d" / "b_label.png", np.zeros((4, 4)))
    name = new_name("onefolder")
    register_from_cfg(_cfg("DATASETS.SEM_SEG", repr([[name, str(tmp_path / "d"), str(tmp_path / "d"), ["x", "y"]]])))
    records = DatasetCatalog.get(name)
    assert [(r["image_id"], os.path.basename(r["sem_seg_file_name"])) for r in records] == [
        ("a", "a_mask.png"), ("b", "b_label.png")]


def test_sem_seg_ignore_label_must_match_the_model_ignore_value(tmp_path, new_name):
    name = new_name("ign")
    entry = [name, str(tmp_path), str(tmp_path), ["a", "b"], 250]
    register_from_cfg(_cfg("DATASETS.SEM_SEG", repr([entry])))  # not used by this config: fine
    with pytest.raises(ValueError, match=r"SEM_SEG\[0\].*IGNORE_LABEL 250.*IGNORE_VALUE is 255.*IGNORE_VALUE 250"):
        register_from_cfg(_cfg("DATASETS.SEM_SEG", repr([entry]), "DATASETS.TRAIN", f"('{name}',)"))
    register_from_cfg(_cfg("DATASETS.SEM_SEG", repr([entry]), "DATASETS.TRAIN", f"('{name}',)",
                           "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "250"))
    assert MetadataCatalog.get(name).ignore_label == 250


@pytest.mark.parametrize("entry,match", [
    (["n", "i", "g", []], "non-empty names"),
    (["n", "i", "g", ["a", "a"]], r"names \['a'\] more than once"),
    (["n", "i", "g", ["a", "b"], 1], "IGNORE_LABEL 1 is one of the 2 class ids"),
    (["n", "i", "g", "missing_classes.txt"], "class file missing_classes.txt does not exist"),
    (["n", "i", "g"], r"cfg.DATASETS.SEM_SEG\[0\] must be a list of 4 to 5"),
])
def test_sem_seg_entry_errors_name_the_key(entry, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        register_from_cfg(_cfg("DATASETS.SEM_SEG", repr([entry])))


# ---- DATASETS.COCO_INSTANCES and SEM_SEG_FROM_COCO -----------------------------------------------------------


def _write_coco(path, images, annotations, categories):
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def test_coco_twin_rasterises_objects_crowds_and_background(tmp_path, new_name):
    root = tmp_path / "images"
    for name in ("a.jpg", "b.jpg"):
        _png(root / name, np.zeros((8, 10, 3)))
    crowd = {"size": [8, 10], "counts": [70, 8, 2]}  # column-major pixels 70..77: column 8 rows 6-7, column 9 rows 0-5
    _write_coco(tmp_path / "ann.json",
                [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 10},
                 {"id": 2, "file_name": "b.jpg", "height": 8, "width": 10}],
                [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 6, 6], "iscrowd": 0, "area": 36,
                  "segmentation": [[0, 0, 6, 0, 6, 6, 0, 6]]},
                 {"id": 2, "image_id": 1, "category_id": 3, "bbox": [2, 2, 2, 2], "iscrowd": 0, "area": 4,
                  "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]]},
                 {"id": 3, "image_id": 1, "category_id": 3, "bbox": [8, 0, 1, 8], "iscrowd": 1, "area": 8,
                  "segmentation": crowd}],
                [{"id": 7, "name": "house"}, {"id": 3, "name": "pool"}])
    coco, twin = new_name("coco"), new_name("twin")
    cfg = _cfg("DATASETS.COCO_INSTANCES", repr([[coco, str(tmp_path / "ann.json"), str(root)]]),
               "DATASETS.SEM_SEG_FROM_COCO", repr([[twin, coco, str(tmp_path / "labels")]]))
    assert register_from_cfg(cfg) == [coco, twin]
    # Known before anything is loaded: categories sorted by id, as Detectron2 orders thing classes.
    assert MetadataCatalog.get(twin).stuff_classes == ["background", "pool", "house"]
    records = DatasetCatalog.get(twin)
    assert [r["image_id"] for r in records] == [1, 2] and "annotations" not in records[0]
    label = np.array(Image.open(records[0]["sem_seg_file_name"]))
    assert label[1, 1] == 2 and label[3, 3] == 1  # house, and the smaller pool drawn on top of it
    assert label[7, 1] == 0 and label[7, 8] == 255 and label[7, 9] == 0  # background, crowd, background
    assert (np.array(Image.open(records[1]["sem_seg_file_name"])) == 0).all()  # no objects: background
    assert MetadataCatalog.get(coco).thing_classes == ["pool", "house"]

    # A second load reuses the maps; a changed JSON rewrites them.
    mtime = os.stat(records[0]["sem_seg_file_name"]).st_mtime_ns
    assert os.stat(DatasetCatalog.get(twin)[0]["sem_seg_file_name"]).st_mtime_ns == mtime
    data = json.loads((tmp_path / "ann.json").read_text())
    data["annotations"] = data["annotations"][:1]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    label = np.array(Image.open(DatasetCatalog.get(twin)[0]["sem_seg_file_name"]))
    assert label[3, 3] == 2 and label[7, 8] == 0


def test_coco_twin_label_maps_go_under_the_prepared_root_by_default(tmp_path, new_name, monkeypatch):
    monkeypatch.setenv("SELFTRAIN_PREPARED_ROOT", str(tmp_path / "prepared"))
    paths, image_root = _shapes(tmp_path, counts=(2, 1, 1))
    coco, twin = new_name("coco"), new_name("twin")
    register_from_cfg(_cfg("DATASETS.COCO_INSTANCES", repr([[coco, paths["train"], image_root]]),
                           "DATASETS.SEM_SEG_FROM_COCO", repr([[twin, coco]])))
    root = MetadataCatalog.get(twin).sem_seg_root
    assert root.startswith(str(tmp_path / "prepared" / "sem_seg_from_coco" / f"{twin}-"))
    assert [os.path.relpath(r["sem_seg_file_name"], root) for r in DatasetCatalog.get(twin)] == [
        "train_0000.png", "train_0001.png"]
    with pytest.raises(KeyError, match="COCO dataset 'no_such_coco' is not registered"):
        register_from_cfg(_cfg("DATASETS.SEM_SEG_FROM_COCO", repr([[new_name("twin"), "no_such_coco"]])))


def test_names_collide_loudly(tmp_path, new_name):
    paths, image_root = _shapes(tmp_path, counts=(2, 1, 1))
    name = new_name("coco")
    register_from_cfg(_cfg("DATASETS.COCO_INSTANCES", repr([[name, paths["train"], image_root]])))
    register_from_cfg(_cfg("DATASETS.COCO_INSTANCES", repr([[name, paths["train"], image_root]])))  # the same
    with pytest.raises(ValueError, match=f"{name}.*train.json.*cannot register it again.*val.json"):
        register_from_cfg(_cfg("DATASETS.COCO_INSTANCES", repr([[name, paths["val"], image_root]])))
    with pytest.raises(ValueError, match="'coco_2017_val' is already registered by other code.*val.json"):
        register_from_cfg(_cfg("DATASETS.COCO_INSTANCES", repr([["coco_2017_val", paths["val"], image_root]])))


def test_coco_dataset_missing_files_name_the_path(tmp_path, new_name):
    name = new_name("coco")
    register_from_cfg(_cfg("DATASETS.COCO_INSTANCES", repr([[name, str(tmp_path / "nope.json"), str(tmp_path)]])))
    with pytest.raises(FileNotFoundError, match="json_file: .*nope.json"):
        DatasetCatalog.get(name)


# ---- DATASETS.HELDOUT, splits --------------------------------------------------------------------------------


def test_heldout_labels_score_pseudo_labels_and_conflicts_are_errors(tmp_path, new_name):
    paths, image_root = _shapes(tmp_path, counts=(1, 3, 1))
    unlabeled, twin, folder = new_name("unl"), new_name("twin"), new_name("folder")
    register_from_cfg(_cfg(
        "DATASETS.COCO_INSTANCES", repr([[unlabeled, paths["unlabeled"], image_root]]),
        "DATASETS.SEM_SEG_FROM_COCO", repr([[twin, unlabeled, str(tmp_path / "twin")]]),
        "DATASETS.IMAGE_FOLDERS", repr([[folder, image_root]]),
        "DATASETS.HELDOUT", repr([[unlabeled, twin], [folder, str(tmp_path / "twin")]])))
    lookup, classes, source = heldout_labels(unlabeled)
    assert classes == SHAPES and source == f"dataset {twin!r}"
    # Perfect pseudo labels: the held-out maps themselves, under the keys pseudo labelling gives them.
    records = [{"file_name": r["file_name"], "image_id": str(r["image_id"]), "sem_seg_file_name":
                r["sem_seg_file_name"]} for r in DatasetCatalog.get(twin)]
    q = pseudo_label_quality(records, lookup, classes)
    assert q["images"] == 3 and q["missing"] == 0 and q["pACC"] == 100.0 and q["coverage"] == 100.0
    assert heldout_labels(folder)[0] == str(tmp_path / "twin")
    with pytest.raises(ValueError, match=f"{unlabeled!r} already has the held-out labels {twin!r}"):
        register_from_cfg(_cfg("DATASETS.HELDOUT", repr([[unlabeled, str(tmp_path / "other")]])))
    with pytest.raises(KeyError, match="neither a registered dataset nor a folder"):
        register_from_cfg(_cfg("DATASETS.HELDOUT", repr([[unlabeled, "no_such_dataset"]])))


def test_unlabeled_half_of_a_split_is_scored_against_its_base(tmp_path, new_name):
    paths, image_root = _shapes(tmp_path, counts=(4, 1, 1))
    coco, twin, split = new_name("coco"), new_name("twin"), new_name("split")
    write_split_file(tmp_path / "s.txt", ["1"])
    register_from_cfg(_cfg(
        "DATASETS.COCO_INSTANCES", repr([[coco, paths["train"], image_root]]),
        "DATASETS.SEM_SEG_FROM_COCO", repr([[twin, coco, str(tmp_path / "twin")]]),
        "DATASETS.SPLITS", repr([[split, twin, str(tmp_path / "s.txt")]])))
    lookup, classes, source = heldout_labels(split + "_unlabeled")
    assert source == f"dataset {twin!r}" and classes == SHAPES
    unlabeled = DatasetCatalog.get(split + "_unlabeled")
    assert len(unlabeled) == 3 and all("sem_seg_file_name" not in r for r in unlabeled)
    assert all(os.path.realpath(r["file_name"]) in lookup for r in unlabeled)


def test_splits_key_by_file_name_where_coco_ids_repeat(tmp_path, new_name):
    """Two COCO files numbering their images from 1, loaded as one dataset (as an imports module would)."""
    jsons = {}
    for part in ("survey1", "survey2"):
        paths, image_root = _shapes(tmp_path / part, counts=(3, 1, 1))
        jsons[part] = (paths["train"], image_root)
    name, split = new_name("merged"), new_name("split")
    DatasetCatalog.register(name, lambda: [r for j, root in jsons.values() for r in load_coco_json(j, root)])
    MetadataCatalog.get(name).set(evaluator_type="coco")
    keys = split_keys(DatasetCatalog.get(name), name)
    assert keys == [f"{p}/images/train_{i:04d}" for p in ("survey1", "survey2") for i in range(3)]
    write_split_file(tmp_path / "s.txt", ["survey2/images/train_0001"])
    register_split(split, name, str(tmp_path / "s.txt"))
    chosen = DatasetCatalog.get(split)
    assert [os.path.relpath(r["file_name"], tmp_path) for r in chosen] == ["survey2/images/train_0001.jpg"]
    assert len(DatasetCatalog.get(split + "_unlabeled")) == 5


# ---- recipe datasets: / imports: ---------------------------------------------------------------------------


def test_recipe_datasets_block_resolves_paths_and_adds_to_every_config(tmp_path):
    (tmp_path / "data.yaml").write_text(
        "COCO_INSTANCES: [[r_train, d/train.json, d/images]]\nSEM_SEG: [[r_seg, img, gt, classes.txt]]\n"
        "HELDOUT: [[r_train, r_seg], [r_seg, ./held]]\n")
    (tmp_path / "mine.py").write_text("")
    stages = {"teacher": {"type": "train", "config": DEMO_CONFIG}}
    recipe = parse_recipe({"datasets": "data.yaml", "imports": ["mine.py", "json"], "stages": stages},
                          str(tmp_path / "sub" / ".." / "r.yaml"))
    assert recipe.datasets == {
        "COCO_INSTANCES": [["r_train", str(tmp_path / "d/train.json"), str(tmp_path / "d/images")]],
        "SEM_SEG": [["r_seg", str(tmp_path / "img"), str(tmp_path / "gt"), str(tmp_path / "classes.txt")]],
        "HELDOUT": [["r_train", "r_seg"], ["r_seg", str(tmp_path / "held")]],
    }
    assert recipe.imports == [str(tmp_path / "mine.py"), "json"]
    # Added after a config's own entries, never twice.
    own = repr([["own", "/x.json", "/img"]])
    opts = recipe.data_opts(DEMO_CONFIG, ["DATASETS.COCO_INSTANCES", own])
    cfg = load_config(DEMO_CONFIG, ["DATASETS.COCO_INSTANCES", own] + opts)
    assert [e[0] for e in cfg.DATASETS.COCO_INSTANCES] == ["own", "r_train"]
    assert cfg.SELFTRAIN.IMPORTS == [str(tmp_path / "mine.py"), "json"]
    merged = ["DATASETS.COCO_INSTANCES", own] + opts
    assert recipe.data_opts(DEMO_CONFIG, merged) == opts  # merging again adds nothing


@pytest.mark.parametrize("raw,match", [
    ({"datasets": {"COCO": []}}, "unknown key 'COCO'"),
    ({"datasets": {"PSEUDO_LABEL_FOLDERS": []}}, "unknown key 'PSEUDO_LABEL_FOLDERS'"),
    ({"datasets": {"SEM_SEG_FROM_COCO": [["only"]]}}, r"datasets.SEM_SEG_FROM_COCO\[0\] must be a list of 2 to 3"),
    ({"datasets": "nowhere.yaml"}, "nowhere.yaml is not a file"),
    ({"imports": ["gone.py"]}, "gone.py'] not found"),
    ({"imports": "json"}, "'imports' must be a list"),
])
def test_recipe_data_errors_name_the_file_and_key(tmp_path, raw, match):
    raw = {"stages": {"teacher": {"type": "train", "config": DEMO_CONFIG}}, **raw}
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw, str(tmp_path / "r.yaml"))


# ---- training-set statistics, report warnings and pictures ------------------------------------------------


def test_training_log_gives_size_class_shares_and_warns_for_a_missing_class(tmp_path, new_name, caplog):
    name = new_name("shares")
    records = []
    for i in range(3):
        label = np.zeros((4, 5), np.uint8)
        label[:, : i + 1] = 1
        _png(tmp_path / f"{i}.png", label)
        records.append({"file_name": f"{i}.jpg", "sem_seg_file_name": str(tmp_path / f"{i}.png")})
    MetadataCatalog.get(name).set(stuff_classes=["ground", "house", "pool"], ignore_label=255)
    cfg = _cfg("DATASETS.TRAIN", f"('{name}',)")
    with caplog.at_level(logging.INFO, logger="selftrain_d2"):
        shares = log_training_set(cfg, records)
    # 3 maps of 4 x 5 pixels; house fills 1, 2 and 3 of their 5 columns: 24 of 60 pixels.
    assert shares == pytest.approx({"ground": 60.0, "house": 40.0, "pool": 0.0})
    assert "Training set: 3 images" in caplog.text
    assert "ground 60.0%, house 40.0%, pool 0.0%" in caplog.text
    assert any(r.levelname == "WARNING" and "pool" in r.getMessage() for r in caplog.records)


def test_label_figure_is_readable_at_any_image_size(tmp_path):
    classes, colors = ["ground", "house"], np.array([[0, 0, 200], [200, 0, 0]], np.uint8)
    small = np.zeros((16, 24, 3), np.uint8)
    label = np.zeros((16, 24), np.uint8)
    label[4:8, 4:8] = 1
    label[0] = 255
    out = label_figure(small, [("pseudo label", label), ("held-out label", label)], classes, colors, 255,
                       str(tmp_path / "small.png"))
    width, height = Image.open(out).size
    assert height >= 256 and width >= 3 * 256 * 24 / 16  # upscaled to a 256-pixel shorter side, 3 panels
    big = np.zeros((1500, 3000, 3), np.uint8)
    out = label_figure(big, [("pseudo label", np.zeros((1500, 3000), np.uint8))], classes, colors, 255,
                       str(tmp_path / "big.png"))
    width, height = Image.open(out).size
    assert width <= 2 * 1024 + 200 and height <= 512 + 200  # shrunk to a 1024-pixel longer side


def test_never_predicted_reads_the_evaluator_predictions(tmp_path, new_name):
    name = new_name("val")
    MetadataCatalog.get(name).set(stuff_classes=["ground", "house", "pool"])
    folder = tmp_path / "inference" / name
    folder.mkdir(parents=True)
    (folder / "sem_seg_predictions.json").write_text(json.dumps(
        [{"file_name": "a.jpg", "category_id": 0, "segmentation": {}},
         {"file_name": "b.jpg", "category_id": 2, "segmentation": {}}]))
    assert never_predicted(str(tmp_path)) == {name: ["house"]}

    from types import SimpleNamespace

    from selftrain_d2.orchestration.recipe.report import _evaluation_warnings

    ctx = SimpleNamespace(results={"teacher": {"dir": str(tmp_path)}, "gd": {"dir": str(tmp_path / "none")}})
    summary = {"teacher": {"sem_seg": {"IoU-house": 0.0}}, "gd": {"segm": {"AP": 3.0, "AP-car": 0.0, "AP-bus": 5.0}}}
    assert _evaluation_warnings(ctx, summary) == [
        f"stage `teacher` never predicts house on `{name}` (present in its labels)",
        "stage `gd`: mask AP 0 for car (never a correct instance)"]
    summary["teacher"]["sem_seg"]["IoU-house"] = float("nan")  # house is in neither labels nor predictions
    assert _evaluation_warnings(ctx, summary)[0] == f"stage `teacher` never predicts house on `{name}` (absent from " \
        "its labels too)"


# ---- tools and processes: train_net, DDP, a recipe with imports --------------------------------------------


def _train_net(args, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_train_net_trains_and_evaluates_datasets_registered_by_the_config(tmp_path, new_name):
    paths, image_root = _shapes(tmp_path / "coco")
    img, gt, classes = _sem_seg_folder(tmp_path / "folder", paths["train"], image_root)
    out = tmp_path / "out"
    log = _train_net([
        "--config-file", DEMO_CONFIG, *FAST_OPTS, "OUTPUT_DIR", str(out),
        "DATASETS.SEM_SEG", repr([["own_folder_train", img, gt, classes]]),
        "DATASETS.COCO_INSTANCES", repr([["own_coco_val", paths["val"], image_root]]),
        "DATASETS.SEM_SEG_FROM_COCO", repr([["own_coco_val_sem_seg", "own_coco_val", str(tmp_path / "val_maps")]]),
        "DATASETS.TRAIN", "('own_folder_train',)", "DATASETS.TEST", "('own_coco_val_sem_seg',)"])
    assert "Training set: 6 images from own_folder_train" in log
    assert re.search(r"class pixel shares \(from 6 of 6 label maps\): background \d+\.\d%, disc", log)
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert set(f"IoU-{c}" for c in SHAPES) <= set(metrics["sem_seg"]) and 0 <= metrics["sem_seg"]["mIoU"] <= 100
    assert len(os.listdir(tmp_path / "val_maps")) == 4 + 1  # 4 label maps and the marker


IMPORTED_MODULE = '''
import os
from detectron2.data import DatasetCatalog, MetadataCatalog
from selftrain_d2.data.datasets.sem_seg_folder import load_sem_seg_folder

with open(os.environ["OWN_DATA_IMPORT_LOG"], "a") as f:
    f.write(f"{{os.getpid()}}\\n")
if "own_imported_val" not in DatasetCatalog.list():
    DatasetCatalog.register("own_imported_val", lambda: load_sem_seg_folder("own_imported_val", {img!r}, {gt!r}))
    MetadataCatalog.get("own_imported_val").set(stuff_classes={classes!r}, ignore_label=255, evaluator_type="sem_seg")
'''


@pytest.mark.slow
def test_two_ddp_processes_import_and_register_the_datasets(tmp_path):
    paths, image_root = _shapes(tmp_path / "coco")
    img, gt, _ = _sem_seg_folder(tmp_path / "folder", paths["val"], image_root)
    module = tmp_path / "own_registrations.py"
    module.write_text(IMPORTED_MODULE.format(img=img, gt=gt, classes=SHAPES))
    imports_log = tmp_path / "imports.log"
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DEMO_CONFIG,
           "--num-gpus", "2", *FAST_OPTS, "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "4", "OUTPUT_DIR", str(out),
           "SELFTRAIN.IMPORTS", repr([str(module)]),
           "DATASETS.COCO_INSTANCES", repr([["own_ddp_train", paths["train"], image_root]]),
           "DATASETS.SEM_SEG_FROM_COCO", repr([["own_ddp_train_sem_seg", "own_ddp_train", str(tmp_path / "maps")]]),
           "DATASETS.TRAIN", "('own_ddp_train_sem_seg',)", "DATASETS.TEST", "('own_imported_val',)"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(CPU_ENV, OWN_DATA_IMPORT_LOG=str(imports_log)),
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "World size: 2" in log
    pids = set(imports_log.read_text().split())
    assert len(pids) >= 2  # each worker process imported the module (the launcher may have too)
    assert "sem_seg" in json.loads((out / "final_metrics.json").read_text())


@pytest.mark.slow
def test_recipe_imports_and_datasets_reach_the_stage_processes(tmp_path):
    paths, image_root = _shapes(tmp_path / "coco")
    img, gt, classes = _sem_seg_folder(tmp_path / "folder", paths["train"], image_root)
    (tmp_path / "own_recipe_registrations.py").write_text(IMPORTED_MODULE.format(img=img, gt=gt, classes=SHAPES))
    imports_log = tmp_path / "imports.log"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: own-imports\n"
        "imports: [own_recipe_registrations.py]\n"
        f"datasets:\n  SEM_SEG: [[own_recipe_train, folder/img, folder/gt, folder/classes.txt]]\n"
        "stages:\n  teacher:\n    type: train\n"
        f"    config: {DEMO_CONFIG}\n"
        f"    opts: [DATASETS.TRAIN, \"('own_recipe_train',)\", DATASETS.TEST, \"('own_imported_val',)\"]\n")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "run_recipe.py"), "--config-file", str(recipe),
           "--output", str(tmp_path / "out"), "--no-report", *FAST_OPTS, "SOLVER.MAX_ITER", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(CPU_ENV, OWN_DATA_IMPORT_LOG=str(imports_log)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert imports_log.read_text().split()  # the stage process imported the module
    config = load_config(str(tmp_path / "out" / "teacher" / "config.yaml"))
    assert config.SELFTRAIN.IMPORTS == [str(tmp_path / "own_recipe_registrations.py")]
    assert config.DATASETS.SEM_SEG == [["own_recipe_train", img, gt, classes]]
    assert "sem_seg" in json.loads((tmp_path / "out" / "summary.json").read_text())["teacher"]


# ---- the README walkthrough --------------------------------------------------------------------------------


def walkthrough_commands():
    """The shell commands of the walkthrough block in datasets/README.md, in order."""
    with open(os.path.join(ROOT, "datasets", "README.md")) as f:
        text = f.read()
    section = text[text.index("### Walkthrough: COCO JSON"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


WALKTHROUGH_FAST = [
    "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
    "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.CROP.SIZE", "(64, 96)", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", "[16]", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "SEMISUP.BURN_IN_ITERS", "1", "SEMISUP.UNLABELED_IMS_PER_BATCH", "2",
]


def _run_walkthrough(tmp_path, which):
    """The README's set-up commands, then its ``run_recipe.py`` command for the recipe ``which``, in a
    temporary ``my_project`` (tiny data and schedules appended)."""
    project = str(tmp_path / "my_project")
    os.makedirs(project)
    commands = [c.replace("my_project", project) for c in walkthrough_commands()]
    setup = [c for c in commands if "run_recipe.py" not in c]
    recipe = [c for c in commands if "run_recipe.py" in c and f"{which}.yaml" in c]
    assert len(setup) == 2 and len(recipe) == 1, commands
    setup[0] += " --counts 6 6 4 --size 64 96"
    run = recipe[0] + " " + shlex.join(WALKTHROUGH_FAST)
    for command in setup + [run]:
        command = command.replace("python ", f"{shlex.quote(sys.executable)} ", 1)
        proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=CPU_ENV, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n" + (proc.stdout + proc.stderr)[-6000:]
    output = re.search(r"--output (\S+)", run).group(1)
    return output, json.loads(open(os.path.join(output, "summary.json")).read())


@pytest.mark.slow
def test_walkthrough_self_training_scores_pseudo_labels_against_heldout_labels(tmp_path):
    output, summary = _run_walkthrough(tmp_path, "self-training")
    assert set(summary) == {"teacher", "student"} and all("mIoU" in s["sem_seg"] for s in summary.values())
    report = open(os.path.join(output, "report.md")).read()
    assert "Against held-out labels (dataset 'my_unlabeled_sem_seg', 6 images, 0 without one)" in report
    stats = json.load(open(os.path.join(output, "report", "pseudo_label_stats.json")))
    assert 0 <= stats["quality"]["pseudo_labels"]["pACC"] <= 100
    pictures = [p for p in os.listdir(os.path.join(output, "report")) if p.startswith("overlay_")]
    assert len(pictures) == 4 and all(f"report/{p}" in report for p in pictures)
    # A class the pseudo labels lack is a warning at the top of the report (after two iterations, some are).
    never = [c for c, n in zip(SHAPES, stats["pixel_counts"]["pseudo_labels"]["pseudo"]) if n == 0]
    warning = f"**Warning:** pseudo labels `pseudo_labels` never contain {', '.join(never)}\n"
    assert (warning in report) == bool(never)
    if never:
        assert report.index(warning) < report.index("## Stages")
    teacher_config = load_config(os.path.join(output, "teacher", "config.yaml"))
    assert teacher_config.DATASETS.HELDOUT == [["my_unlabeled", "my_unlabeled_sem_seg"]]


@pytest.mark.slow
def test_walkthrough_guided_distillation(tmp_path):
    _, summary = _run_walkthrough(tmp_path, "guided-distillation")
    assert set(summary) == {"teacher", "student", "ema_teacher"}
    assert all(0 <= s["segm"]["AP"] <= 100 for s in summary.values())
