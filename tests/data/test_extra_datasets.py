"""Mapillary Vistas, BDD100K, CamVid and KITTI registrations on tiny fake folders in their public layouts."""
import importlib.util
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

from selftrain_d2.data.datasets import bdd100k, camvid, kitti, mapillary_vistas
from selftrain_d2.data.image_io import LabelValueError, read_sem_seg

from ..conftest import ROOT

H, W = 8, 16


def _image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(path)


def _label(path, array, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.asarray(array, np.uint8))
    if palette:  # Mapillary ships palette PNGs whose indices are the ids
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        im.putdata(np.asarray(array, np.uint8).ravel().tolist())
    im.save(path)


def _stripes(*values):
    """An HxW label map made of vertical stripes, one per value."""
    arr = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):
        arr[:, i * W // len(values):(i + 1) * W // len(values)] = v
    return arr


def _prepare_script(name):
    """datasets/prepare_sem_seg.py NAME, as a function of the remaining command-line arguments."""
    path = os.path.join(ROOT, "datasets", "prepare_sem_seg.py")
    spec = importlib.util.spec_from_file_location("prepare_sem_seg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda argv: module.main([name] + list(argv))


@pytest.fixture
def prefix():
    """A unique dataset-name prefix; every dataset registered under it is removed afterwards."""
    p = f"test_extra_{uuid.uuid4().hex[:8]}"
    yield p
    for name in DatasetCatalog.list():
        if name.startswith(p):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _read(path):
    return np.array(Image.open(path))


# ---- Mapillary Vistas ---------------------------------------------------------------------------------------


def _fake_mapillary(root, label_dir="v1.2/labels", extra=None):
    labels = {"a": _stripes(13, 65, 64), "b": _stripes(0, 27)}
    labels.update(extra or {})
    for split in ("training", "validation"):
        for stem, arr in labels.items():
            _image(str(root / "mapillary_vistas" / split / "images" / f"{stem}.jpg"))
            _label(str(root / "mapillary_vistas" / split / label_dir / f"{stem}.png"), arr, palette=True)
    return labels


def test_mapillary_needs_prepare_then_loads_train_ids(tmp_path, prefix):
    root, prep = tmp_path / "d2", tmp_path / "prep"
    labels = _fake_mapillary(root)
    names = mapillary_vistas.register_mapillary_vistas(root=str(root), prepared=str(prep), prefix=prefix)
    assert names == [f"{prefix}_train", f"{prefix}_val"]
    meta = MetadataCatalog.get(names[0])
    assert len(meta.stuff_classes) == 65 and len(meta.stuff_colors) == 65
    assert meta.stuff_classes[13] == "Road" and meta.stuff_classes[64] == "Ego Vehicle"
    assert meta.stuff_colors[13] == [128, 64, 128] and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"

    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(names[0])
    msg = str(err.value)
    for part in (repr(names[0]), str(prep / "mapillary_vistas" / "train"), "prepare_sem_seg.py mapillary_vistas",
                 f"--root {root}", f"--output {prep}"):
        assert part in msg, part

    main = _prepare_script("mapillary_vistas")
    main(["--root", str(root), "--output", str(prep)])
    records = DatasetCatalog.get(names[0])
    assert [r["image_id"] for r in records] == ["a", "b"]
    assert records[0]["file_name"] == str(root / "mapillary_vistas" / "training" / "images" / "a.jpg")
    assert records[0]["sem_seg_file_name"] == str(prep / "mapillary_vistas" / "train" / "a.png")
    got = _read(records[0]["sem_seg_file_name"])
    expected = labels["a"].copy()
    expected[expected == 65] = 255
    np.testing.assert_array_equal(got, expected)
    assert sorted(np.unique(got)) == [13, 64, 255]
    read_sem_seg(records[0]["sem_seg_file_name"], 65)  # valid train ids for the training mapper
    # The raw dataset folder is untouched, a second run rewrites nothing.
    assert sorted(np.unique(_read(root / "mapillary_vistas/training/v1.2/labels/a.png"))) == [13, 64, 65]
    assert mapillary_vistas.prepare(root=str(root), output=str(prep), log=lambda s: None) == {
        "train": (0, 2), "val": (0, 2)}


def test_mapillary_older_layout_and_unknown_ids(tmp_path):
    root = tmp_path / "d2"
    _fake_mapillary(root, label_dir="labels", extra={"c": _stripes(3, 70)})
    assert mapillary_vistas.source_label_dir(str(root), "val") == str(root / "mapillary_vistas/validation/labels")
    with pytest.raises(LabelValueError) as err:
        mapillary_vistas.prepare(root=str(root), output=str(tmp_path / "prep"), log=lambda s: None)
    assert "c.png" in str(err.value) and "[70]" in str(err.value)


# ---- BDD100K ------------------------------------------------------------------------------------------------


def test_bdd100k_reads_train_ids_in_place_and_names_missing_labels(tmp_path, prefix):
    root = tmp_path / "d2"
    base = root / "bdd100k" / "seg"
    for split in ("train", "val"):
        for stem in ("0a0a0b1a-7c39d841", "0a0c3694-4cc8b0e3"):
            _image(str(base / "images" / split / f"{stem}.jpg"))
            _label(str(base / "labels" / split / f"{stem}_train_id.png"), _stripes(0, 18, 255))
    _image(str(base / "images" / "val" / "nolabel.jpg"))
    names = bdd100k.register_bdd100k(root=str(root), prefix=prefix)
    meta = MetadataCatalog.get(names[0])
    assert meta.stuff_classes[0] == "road" and meta.stuff_classes[18] == "bicycle" and len(meta.stuff_classes) == 19
    assert meta.stuff_colors[13] == [0, 0, 142] and meta.sem_seg_root == str(base / "labels" / "train")
    records = DatasetCatalog.get(names[0])
    assert [r["image_id"] for r in records] == ["0a0a0b1a-7c39d841", "0a0c3694-4cc8b0e3"]
    assert records[1]["sem_seg_file_name"] == str(base / "labels" / "train" / "0a0c3694-4cc8b0e3_train_id.png")
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(names[1])
    assert "1 of 3 images" in str(err.value) and str(base / "labels" / "val" / "nolabel_train_id.png") in str(err.value)


def test_missing_dataset_names_folder_and_env(tmp_path, prefix, monkeypatch):
    root = tmp_path / "nowhere"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    names = bdd100k.register_bdd100k(root=str(root), prefix=prefix)
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(names[0])
    msg = str(err.value)
    assert str(root / "bdd100k" / "seg" / "images" / "train") in msg
    assert f"DETECTRON2_DATASETS={str(root)!r}" in msg and "datasets/README.md" in msg
    with pytest.raises(SystemExit) as err:
        _prepare_script("camvid")(["--root", str(root), "--output", str(tmp_path / "prep")])
    assert str(root / "CamVid" / "trainannot") in str(err.value)


# ---- CamVid ---------------------------------------------------------------------------------------------------


def test_camvid_void_becomes_ignore(tmp_path, prefix):
    root, prep = tmp_path / "d2", tmp_path / "prep"
    for split, stems in (("train", ["0001TP_006690", "Seq05VD_f00000"]), ("val", ["0016E5_07959"]),
                         ("test", ["0001TP_008550"])):
        for stem in stems:
            _image(str(root / "CamVid" / split / f"{stem}.png"))
            _label(str(root / "CamVid" / f"{split}annot" / f"{stem}.png"), _stripes(0, 10, 11, 3))
    names = camvid.register_camvid(root=str(root), prepared=str(prep), prefix=prefix)
    assert names == [f"{prefix}_train", f"{prefix}_val", f"{prefix}_test"]
    meta = MetadataCatalog.get(names[2])
    assert meta.stuff_classes == ["sky", "building", "pole", "road", "sidewalk", "tree", "sign symbol", "fence",
                                  "car", "pedestrian", "bicyclist"]
    assert meta.stuff_colors[3] == [128, 64, 128]
    assert camvid.prepare(root=str(root), output=str(prep), log=lambda s: None) == {
        "train": (2, 0), "val": (1, 0), "test": (1, 0)}
    records = DatasetCatalog.get(names[0])
    assert [r["image_id"] for r in records] == ["0001TP_006690", "Seq05VD_f00000"]
    np.testing.assert_array_equal(_read(records[1]["sem_seg_file_name"]), _stripes(0, 10, 255, 3))
    assert len(DatasetCatalog.get(names[2])) == 1


# ---- KITTI ------------------------------------------------------------------------------------------------------


def test_kitti_label_ids_to_train_ids_and_evaluator(tmp_path, prefix):
    root, prep = tmp_path / "d2", tmp_path / "prep"
    # Cityscapes label ids: 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 0 unlabeled / 9 parking -> 255.
    raw = {"000000_10": _stripes(7, 26, 0, 33), "000001_10": _stripes(9, 23)}
    for stem, arr in raw.items():
        _image(str(root / "data_semantics" / "training" / "image_2" / f"{stem}.png"))
        _label(str(root / "data_semantics" / "training" / "semantic" / f"{stem}.png"), arr)
    (name,) = kitti.register_kitti(root=str(root), prepared=str(prep), prefix=prefix)
    assert name == f"{prefix}_train"
    with pytest.raises(FileNotFoundError, match="prepare_sem_seg.py kitti"):
        DatasetCatalog.get(name)
    _prepare_script("kitti")(["--root", str(root), "--output", str(prep)])
    records = DatasetCatalog.get(name)
    np.testing.assert_array_equal(_read(records[0]["sem_seg_file_name"]), _stripes(0, 13, 255, 18))
    np.testing.assert_array_equal(_read(records[1]["sem_seg_file_name"]), _stripes(255, 10))

    # Detectron2's SemSegEvaluator reads the prepared files as they are: a perfect prediction scores 100.
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    for r in records:
        gt = torch.as_tensor(_read(r["sem_seg_file_name"]).astype(np.int64))
        logits = torch.nn.functional.one_hot(gt.clamp(max=18), 19).permute(2, 0, 1).float()
        evaluator.process([{"file_name": r["file_name"]}], [{"sem_seg": logits}])
    result = evaluator.evaluate()["sem_seg"]
    assert result["mIoU"] == pytest.approx(100.0) and result["IoU-road"] == pytest.approx(100.0)


# ---- registration on import ---------------------------------------------------------------------------------


def test_builtin_names_registered_lazily():
    import selftrain_d2

    selftrain_d2.register_all()
    expected = {
        "mapillary_vistas_sem_seg_train": 65, "mapillary_vistas_sem_seg_val": 65,
        "bdd100k_sem_seg_train": 19, "bdd100k_sem_seg_val": 19,
        "camvid_sem_seg_train": 11, "camvid_sem_seg_val": 11, "camvid_sem_seg_test": 11,
        "kitti_sem_seg_train": 19,
    }
    for name, count in expected.items():
        assert name in DatasetCatalog.list(), name
        meta = MetadataCatalog.get(name)
        assert len(meta.stuff_classes) == count and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
