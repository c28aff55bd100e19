"""N-shot splits: the greedy choice on constructed presence tables, label reading, and the CLI."""
import importlib.util
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from selftrain_d2.data.datasets.nshot import choose_n_shot, class_presence, n_shot_file_name
from selftrain_d2.data.datasets.sem_seg_layout import register_sem_seg_pairs
from selftrain_d2.data.datasets.splits import make_split, read_split_file, read_split_header, register_split
from selftrain_d2.data.image_io import LabelValueError

from ..conftest import ROOT


def test_rare_class_first_reuses_images_that_already_cover_a_class():
    # class 0 only in x, class 2 only in z; x also shows class 1, so class 1 needs nothing more.
    presence = {"x": [0, 1], "y": [1], "z": [2]}
    for seed in range(5):
        assert choose_n_shot(presence, 1, seed) == (["x", "z"], {})


def test_short_classes_are_reported_and_all_their_images_taken():
    presence = {"a": {0, 1}, "b": {0}, "c": {0, 2}, "d": {1}, "e": {0, 1}}
    chosen, short = choose_n_shot(presence, 2, seed=3, num_classes=4)
    assert short == {2: 1, 3: 0}
    assert "c" in chosen
    for cls in (0, 1):
        assert sum(cls in presence[i] for i in chosen) >= 2
    # Order of the table does not matter; the seed does only through the ranking.
    assert choose_n_shot(dict(reversed(list(presence.items()))), 2, seed=3, num_classes=4) == (chosen, short)


def test_single_class_picks_the_seeded_ranking_of_make_split():
    ids = [f"img{i:02d}" for i in range(10)]
    for seed in (1, 2, 7):
        chosen, short = choose_n_shot({i: [0] for i in ids}, 3, seed)
        assert chosen == make_split(ids, 30, seed) and short == {}
    assert choose_n_shot({i: [0] for i in ids}, 3, 1) != choose_n_shot({i: [0] for i in ids}, 3, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive int"):
        choose_n_shot({"a": [0]}, 0, 1)
    with pytest.raises(TypeError, match="seed"):
        choose_n_shot({"a": [0]}, 1, "1")
    with pytest.raises(ValueError, match="unique"):
        choose_n_shot({1: [0], "1": [1]}, 1, 1)
    with pytest.raises(ValueError, match="no sem_seg_file_name"):
        class_presence([{"file_name": "x.jpg"}], 3)


def _dataset(tmp_path, labels):
    for stem, arr in labels.items():
        os.makedirs(tmp_path / "img", exist_ok=True)
        os.makedirs(tmp_path / "lbl", exist_ok=True)
        Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(tmp_path / "img" / f"{stem}.png")
        Image.fromarray(np.asarray(arr, np.uint8)).save(tmp_path / "lbl" / f"{stem}.png")


def test_class_presence_reads_labels_with_min_pixels(tmp_path):
    a = np.full((8, 16), 255, np.uint8)
    a[:, :4] = 0
    a[0, 15] = 2  # one pixel of class 2
    _dataset(tmp_path, {"a": a, "b": np.full((8, 16), 1, np.uint8), "bad": np.full((8, 16), 7, np.uint8)})

    def rec(stem):
        return {"file_name": str(tmp_path / "img" / f"{stem}.png"),
                "sem_seg_file_name": str(tmp_path / "lbl" / f"{stem}.png")}

    assert class_presence([rec("a"), rec("b")], 3) == {"a": [0, 2], "b": [1]}
    assert class_presence([rec("a"), rec("b")], 3, min_pixels=2) == {"a": [0], "b": [1]}
    with pytest.raises(LabelValueError, match="bad.png"):
        class_presence([rec("bad")], 3)


def test_cli_writes_a_split_file_that_registers(tmp_path, new_name, capsys):
    labels = {}
    for i in range(6):
        arr = np.zeros((8, 16), np.uint8)
        arr[:, 8:] = 1 if i % 2 else 0
        if i == 4:
            arr[0, 0] = 2  # class 2 in one image only
        labels[f"im{i}"] = arr
    _dataset(tmp_path, labels)
    name = new_name("nshot")
    register_sem_seg_pairs(name, image_dir=tmp_path / "img", image_ext=".png", label_dir=tmp_path / "lbl",
                           label_suffix=".png", metadata={"stuff_classes": ["zero", "one", "two"]})
    spec = importlib.util.spec_from_file_location("make_splits", os.path.join(ROOT, "selftrain_d2", "cli", "make_splits.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--dataset", name, "--n-shot", "2", "--seeds", "1", "--output-dir", str(tmp_path / "splits")])
    path = tmp_path / "splits" / name / n_shot_file_name(2, 1)
    assert path.name == "2shot_seed1.txt"
    ids = read_split_file(path)
    header = read_split_header(path)
    assert header["n_shot"] == "2" and header["count"] == str(len(ids)) and header["total"] == "6"
    assert header["short_classes"] == "two=1"
    assert "im4" in ids and sum(i in ids for i in ("im1", "im3", "im5")) >= 2 and len(ids) == 3
    assert "'two' appears in only 1 image(s)" in capsys.readouterr().out
    new = new_name("nshot_split")
    register_split(new, name, str(path))
    assert sorted(r["image_id"] for r in DatasetCatalog.get(new)) == sorted(ids)
