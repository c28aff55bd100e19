"""Checked COCO / Cityscapes loaders, image folders and register_from_cfg, on tiny data made here."""
import importlib.util
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic
from PIL import Image

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.data.datasets.checked_builtin import add_path_checks, add_path_checks_to_builtin
from selftrain_d2.data.datasets.image_folder import IMAGE_EXTENSIONS, find_images, register_image_folder
from selftrain_d2.data.datasets.register import register_from_cfg
from selftrain_d2.data.datasets.splits import write_split_file

from ..conftest import ROOT


def _png(path, shape=(8, 16, 3), value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


# ---- checked builtin datasets ---------------------------------------------------------------------------


def test_builtin_loaders_are_wrapped_once_and_keep_metadata():
    add_path_checks_to_builtin()
    before = {n: MetadataCatalog.get(n).as_dict() for n in ("coco_2017_train", "cityscapes_fine_sem_seg_train")}
    assert add_path_checks_to_builtin() == []  # idempotent
    for name in ("coco_2017_train", "coco_2014_val", "cityscapes_fine_sem_seg_train",
                 "cityscapes_fine_instance_seg_val", "cityscapes_fine_panoptic_train"):
        assert getattr(DatasetCatalog[name], "_selftrain_path_checked", False), name
    for name, meta in before.items():
        assert MetadataCatalog.get(name).as_dict() == meta
    assert MetadataCatalog.get("coco_2017_train").evaluator_type == "coco"


def test_builtin_coco_missing_names_path_and_env(tmp_path, monkeypatch):
    add_path_checks_to_builtin()
    meta = MetadataCatalog.get("coco_2017_val")
    if os.path.exists(meta.image_root):
        pytest.skip("a real COCO is installed here")
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get("coco_2017_val")
    msg = str(err.value)
    for part in ("'coco_2017_val'", meta.image_root, meta.json_file, "DETECTRON2_DATASETS is not set",
                 "./datasets", "datasets/README.md"):
        assert part in msg, part


def test_checked_coco_copy_names_path_and_env(tmp_path, monkeypatch, new_name):
    name = new_name("coco")
    root = tmp_path / "d2data"
    register_coco_instances(name, {}, str(root / "coco/annotations/x.json"), str(root / "coco/train2017"))
    assert add_path_checks(name) and not add_path_checks(name)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(name)
    msg = str(err.value)
    for part in (repr(name), str(root / "coco/train2017"), str(root / "coco/annotations/x.json"),
                 f"DETECTRON2_DATASETS={str(root)!r}", "datasets/README.md"):
        assert part in msg, part

    # Once the files are there, the same checked loader loads them.
    (root / "coco/train2017").mkdir(parents=True)
    (root / "coco/annotations").mkdir(parents=True)
    _png(str(root / "coco/train2017/1.jpg"))
    (root / "coco/annotations/x.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "height": 8, "width": 16}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}],
    }))
    assert [r["image_id"] for r in DatasetCatalog.get(name)] == [1]


def _fake_cityscapes(root, with_train_ids=True):
    """cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/..., 3 train images in 2 cities, 1 val image."""
    for split, city, i in [("train", "aachen", 0), ("train", "aachen", 1), ("train", "bochum", 0),
                           ("val", "frankfurt", 0)]:
        stem = f"{city}_{i:06d}_000019"
        _png(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
        gt = f"{root}/gtFine/{split}/{city}/{stem}_gtFine_"
        _png(gt + "labelIds.png", (8, 16), 7)
        _png(gt + "instanceIds.png", (8, 16), 7)
        if with_train_ids:
            _png(gt + "labelTrainIds.png", (8, 16), 0)
        objects = [{"label": "road", "polygon": [[0, 0], [15, 0], [15, 7], [0, 7]]},
                   {"label": "car", "polygon": [[2, 2], [6, 2], [6, 5], [2, 5]]}]
        with open(gt + "polygons.json", "w") as f:
            json.dump({"imgHeight": 8, "imgWidth": 16, "objects": objects}, f)


def _register_checked_cityscapes_semantic(name, root, split="train"):
    """A copy of Detectron2's cityscapes_fine_sem_seg_<split> pointing at root, behind the same check."""
    image_dir, gt_dir = f"{root}/leftImg8bit/{split}/", f"{root}/gtFine/{split}/"
    DatasetCatalog.register(name, lambda: load_cityscapes_semantic(image_dir, gt_dir))
    meta = dict(MetadataCatalog.get(f"cityscapes_fine_sem_seg_{split}").as_dict())
    meta.pop("name")
    meta.update(image_dir=image_dir, gt_dir=gt_dir)
    MetadataCatalog.get(name).set(**meta)
    add_path_checks(name)


def test_checked_cityscapes_semantic_loads(tmp_path, new_name):
    name = new_name("cityscapes_fine_sem_seg_train")
    _fake_cityscapes(tmp_path / "cityscapes")
    _register_checked_cityscapes_semantic(name, tmp_path / "cityscapes")
    records = DatasetCatalog.get(name)
    assert len(records) == 3
    for r in records:
        assert r["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png") and os.path.isfile(r["sem_seg_file_name"])
        assert (r["height"], r["width"]) == (8, 16)
    assert MetadataCatalog.get(name).evaluator_type == "cityscapes_sem_seg"


def test_cityscapes_without_train_ids_points_to_prepare_script(tmp_path, new_name):
    root = tmp_path / "cityscapes"
    _fake_cityscapes(root, with_train_ids=False)
    name = new_name("cityscapes_fine_sem_seg_train")
    _register_checked_cityscapes_semantic(name, root)
    with pytest.raises(FileNotFoundError, match="prepare_cityscapes.sh") as err:
        DatasetCatalog.get(name)
    assert "labelTrainIds" in str(err.value)

    # Some present, one missing: the count and the file are named.
    _fake_cityscapes(root, with_train_ids=True)
    missing = root / "gtFine/train/bochum/bochum_000000_000019_gtFine_labelTrainIds.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3") as err:
        DatasetCatalog.get(name)
    assert str(missing) in str(err.value)


def test_checked_cityscapes_instance(tmp_path, new_name):
    root = tmp_path / "cityscapes"
    _fake_cityscapes(root)
    name = new_name("cityscapes_fine_instance_seg_train")
    image_dir, gt_dir = f"{root}/leftImg8bit/train/", f"{root}/gtFine/train/"
    DatasetCatalog.register(name, lambda: load_cityscapes_instances(image_dir, gt_dir, True, True))
    meta = dict(MetadataCatalog.get("cityscapes_fine_instance_seg_train").as_dict())
    meta.pop("name")
    meta.update(image_dir=image_dir, gt_dir=gt_dir)
    MetadataCatalog.get(name).set(**meta)
    add_path_checks(name)
    if importlib.util.find_spec("shapely") is None:
        with pytest.raises(ModuleNotFoundError, match="shapely"):
            DatasetCatalog.get(name)
    else:
        records = DatasetCatalog.get(name)
        assert len(records) == 3 and all(len(r["annotations"]) == 1 for r in records)  # the car


def test_prepare_cityscapes_script_makes_train_ids(tmp_path, new_name):
    pytest.importorskip("cityscapesscripts")
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    root = tmp_path / "cityscapes"
    _fake_cityscapes(root, with_train_ids=False)
    env = dict(os.environ, PYTHON=__import__("sys").executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "datasets", "prepare_cityscapes.sh"), str(root)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = new_name("cityscapes_fine_sem_seg_train")
    _register_checked_cityscapes_semantic(name, root)
    records = DatasetCatalog.get(name)
    label = np.array(Image.open(records[0]["sem_seg_file_name"]))
    assert set(np.unique(label)) == {0, 13}  # road, car train ids


# ---- image folders -----------------------------------------------------------------------------------


def test_image_folder_recursive_mixed_case(tmp_path, new_name):
    folder = tmp_path / "photos"
    for rel in ["b.JPG", "a.png", "sub/c.Jpeg", "sub/deep/d.TIFF", "e.webp", "f.bmp", "g.tif"]:
        _png(str(folder / "tmp.png"))
        os.makedirs(os.path.dirname(folder / rel), exist_ok=True)
        os.replace(folder / "tmp.png", folder / rel)
    (folder / "notes.txt").write_text("not an image")
    _png(str(folder / ".hidden.png"))
    _png(str(folder / ".cache" / "x.png"))

    name = new_name("folder")
    register_image_folder(name, str(folder))
    records = DatasetCatalog.get(name)
    assert [r["image_id"] for r in records] == ["a", "b", "e", "f", "g", "sub/c", "sub/deep/d"]
    for r in records:
        assert os.path.isabs(r["file_name"]) and os.path.isfile(r["file_name"])
        assert set(r) == {"file_name", "image_id"}
    assert records[-1]["file_name"] == str(folder / "sub" / "deep" / "d.TIFF")
    assert MetadataCatalog.get(name).image_root == str(folder)
    assert find_images(folder) == ["a.png", "b.JPG", "e.webp", "f.bmp", "g.tif", "sub/c.Jpeg", "sub/deep/d.TIFF"]

    register_image_folder(name, str(folder))  # same folder: nothing happens
    with pytest.raises(ValueError, match="already registered"):
        register_image_folder(name, str(tmp_path))


def test_image_folder_errors(tmp_path, new_name):
    missing = new_name("missing")
    register_image_folder(missing, str(tmp_path / "nope"))  # lazy: checked when loaded
    with pytest.raises(FileNotFoundError, match="nope"):
        DatasetCatalog.get(missing)

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    empty = new_name("empty")
    register_image_folder(empty, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(empty)
    assert str(tmp_path / "empty") in str(err.value)
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)

    _png(str(tmp_path / "dup" / "x.png"))
    _png(str(tmp_path / "dup" / "x.jpg"))
    dup = new_name("dup")
    register_image_folder(dup, str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="x.jpg and x.png"):
        DatasetCatalog.get(dup)


# ---- register_from_cfg -------------------------------------------------------------------------------


def test_register_from_cfg(tmp_path, new_name):
    folder = tmp_path / "imgs"
    for i in range(10):
        _png(str(folder / f"{i}.png"))
    write_split_file(tmp_path / "s.txt", ["3", "7"])
    folder_name, split_name = new_name("folder"), new_name("split")
    cfg = get_selftrain_cfg()
    cfg.merge_from_list([
        "DATASETS.IMAGE_FOLDERS", f"[['{folder_name}', '{folder}']]",
        "DATASETS.SPLITS", f"[['{split_name}', '{folder_name}', '{tmp_path / 's.txt'}']]",
        "DATASETS.TRAIN", f"('{split_name}',)",
    ])
    names = register_from_cfg(cfg)
    assert names == [folder_name, split_name, split_name + "_unlabeled"]
    assert register_from_cfg(cfg) == names  # every process calls it; again is harmless
    assert [r["image_id"] for r in DatasetCatalog.get(split_name)] == ["3", "7"]
    assert len(DatasetCatalog.get(split_name + "_unlabeled")) == 8


@pytest.mark.parametrize(
    "key,value,where",
    [
        ("SPLITS", [["only", "two"]], "DATASETS.SPLITS[0]"),
        ("SPLITS", [["a", "b", "c"], ["x", "y", 3]], "DATASETS.SPLITS[1]"),
        ("IMAGE_FOLDERS", [["name", "folder", "extra"]], "DATASETS.IMAGE_FOLDERS[0]"),
        ("IMAGE_FOLDERS", ["name"], "DATASETS.IMAGE_FOLDERS[0]"),
        ("IMAGE_FOLDERS", "name", "DATASETS.IMAGE_FOLDERS"),
    ],
)
def test_register_from_cfg_bad_entry_names_key(key, value, where):
    cfg = get_selftrain_cfg()
    cfg.DATASETS[key] = value
    with pytest.raises(ValueError) as err:
        register_from_cfg(cfg)
    assert where in str(err.value)
