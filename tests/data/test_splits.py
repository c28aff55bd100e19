"""Label-fraction splits: the pure functions, register_split, and tools/make_splits.py."""
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from selftrain_d2.data.datasets.splits import (
    LABEL_KEYS,
    format_percent,
    make_split,
    read_split_file,
    read_split_header,
    register_split,
    split_count,
    split_file_name,
    write_split_file,
)

from ..conftest import ROOT

IDS = [f"img{i:04d}" for i in range(1000)]


# ---- pure functions ----------------------------------------------------------------------------------


def test_same_seed_same_split_and_sorted():
    a = make_split(IDS, 5, seed=3)
    assert a == make_split(list(IDS), 5, seed=3)
    assert a == sorted(a) and len(set(a)) == len(a) and set(a) <= set(IDS)


def test_independent_of_input_order():
    shuffled = list(IDS)
    random.Random(0).shuffle(shuffled)
    for pct in (0.4, 10):
        assert make_split(shuffled, pct, 1) == make_split(IDS, pct, 1) == make_split(IDS[::-1], pct, 1)


@pytest.mark.parametrize("pct,count", [(0.4, 4), (1, 10), (2, 20), (5, 50), (10, 100), (100, 1000)])
def test_counts_of_1000(pct, count):
    assert len(make_split(IDS, pct, 1)) == count
    assert split_count(1000, pct) == count


def test_count_rounds_and_keeps_at_least_one():
    assert split_count(118287, 0.4) == round(118287 * 0.4 / 100) == 473
    assert split_count(2975, 5) == 149  # 148.75
    assert len(make_split(IDS[:10], 1, 0)) == 1  # round(0.1) is 0: one image anyway


def test_different_seeds_differ_and_percents_nest():
    splits = [make_split(IDS, 10, s) for s in (1, 2, 3)]
    assert splits[0] != splits[1] != splits[2] != splits[0]
    small, large = set(make_split(IDS, 1, 7)), set(make_split(IDS, 5, 7))
    assert small < large


def test_int_ids_are_strings():
    assert make_split(range(100), 10, 1) == make_split([str(i) for i in range(100)], 10, 1)


@pytest.mark.parametrize("pct", [0, -1, 100.5])
def test_bad_percent(pct):
    with pytest.raises(ValueError, match="percent"):
        make_split(IDS, pct, 1)


def test_bad_inputs():
    with pytest.raises(TypeError, match="seed"):
        make_split(IDS, 1, seed="1")
    with pytest.raises(ValueError, match="unique"):
        make_split(["a", "b", "a"], 50, 1)
    with pytest.raises(ValueError, match="empty"):
        make_split([], 50, 1)


def test_file_names():
    assert [format_percent(p) for p in (0.4, 1, 1.0, 2, 12.5, 100)] == ["0.4", "1", "1", "2", "12.5", "100"]
    assert split_file_name(0.4, 1) == "0.4pct_seed1.txt"
    assert split_file_name(10.0, 3) == "10pct_seed3.txt"


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "sub" / "s.txt"
    ids = make_split(IDS, 2, 1)
    write_split_file(path, ids, {"dataset": "base", "percent": "2", "seed": 1, "count": len(ids)})
    text = path.read_text()
    assert text.startswith("# dataset: base\n# percent: 2\n# seed: 1\n# count: 20\n")
    assert read_split_file(path) == ids
    assert read_split_header(path) == {"dataset": "base", "percent": "2", "seed": "1", "count": "20"}
    assert os.listdir(path.parent) == ["s.txt"]  # no temporary file left behind


@pytest.mark.parametrize("bad", ["#a", " a", "a\nb", ""])
def test_write_rejects_unreadable_ids(tmp_path, bad):
    with pytest.raises(ValueError):
        write_split_file(tmp_path / "s.txt", ["ok", bad])
    assert not (tmp_path / "s.txt").exists()


def test_read_rejects_duplicates_and_missing(tmp_path):
    (tmp_path / "d.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="more than once"):
        read_split_file(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_split_file(tmp_path / "nope.txt")


# ---- register_split ----------------------------------------------------------------------------------


def _labeled_base(name, n=20):
    """A base dataset whose records carry every kind of label the unlabeled half must lose."""

    def load():
        return [
            {
                "file_name": f"/data/{i:03d}.png",
                "image_id": f"{i:03d}",
                "height": 4,
                "width": 6,
                "annotations": [{"category_id": 0}],
                "sem_seg_file_name": f"/data/{i:03d}_sem.png",
                "pan_seg_file_name": f"/data/{i:03d}_pan.png",
                "segments_info": [],
            }
            for i in range(n)
        ]

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255, evaluator_type="sem_seg")
    return [f"{i:03d}" for i in range(n)]


def test_register_split_partitions_base(tmp_path, new_name):
    base, split = new_name("base"), new_name()
    ids = _labeled_base(base)
    chosen = make_split(ids, 25, 1)
    write_split_file(tmp_path / "s.txt", chosen, {"dataset": base})
    assert register_split(split, base, str(tmp_path / "s.txt")) == [split, split + "_unlabeled"]

    labeled = DatasetCatalog.get(split)
    unlabeled = DatasetCatalog.get(split + "_unlabeled")
    assert sorted(r["image_id"] for r in labeled) == chosen
    assert len(labeled) == 5 and len(unlabeled) == 15
    assert sorted(r["image_id"] for r in labeled + unlabeled) == ids
    assert all("annotations" in r and "sem_seg_file_name" in r for r in labeled)
    for r in unlabeled:
        assert not set(LABEL_KEYS) & set(r)
        assert set(r) == {"file_name", "image_id", "height", "width"}
    for name in (split, split + "_unlabeled"):
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == ["a", "b"] and meta.ignore_label == 255
        assert meta.split_base == base and meta.split_file == str(tmp_path / "s.txt")
    # The base's records were not modified by removing labels from copies.
    assert all("annotations" in r for r in DatasetCatalog.get(base))


def test_register_split_is_lazy_and_names_missing_file(tmp_path, new_name):
    base, split = new_name("base"), new_name()
    _labeled_base(base)
    register_split(split, base, str(tmp_path / "later.txt"))  # does not exist yet: fine until loaded
    with pytest.raises(FileNotFoundError, match="later.txt"):
        DatasetCatalog.get(split)
    write_split_file(tmp_path / "later.txt", ["001"])
    assert [r["image_id"] for r in DatasetCatalog.get(split)] == ["001"]


def test_unknown_ids_error_message(tmp_path, new_name):
    base, split = new_name("base"), new_name()
    _labeled_base(base)
    write_split_file(tmp_path / "s.txt", ["001", "zz_missing1", "zz_missing2"], {"dataset": "other_dataset"})
    register_split(split, base, str(tmp_path / "s.txt"))
    with pytest.raises(ValueError) as err:
        DatasetCatalog.get(split + "_unlabeled")
    msg = str(err.value)
    for part in (str(tmp_path / "s.txt"), repr(base), "2 image id(s)", "zz_missing1", "zz_missing2", "other_dataset"):
        assert part in msg


def test_register_twice(tmp_path, new_name):
    base, split = new_name("base"), new_name()
    _labeled_base(base)
    write_split_file(tmp_path / "a.txt", ["001"])
    write_split_file(tmp_path / "b.txt", ["002"])
    register_split(split, base, str(tmp_path / "a.txt"))
    register_split(split, base, str(tmp_path / "a.txt"))  # same arguments: nothing happens
    with pytest.raises(ValueError, match="already registered"):
        register_split(split, base, str(tmp_path / "b.txt"))
    taken = new_name("taken")
    DatasetCatalog.register(taken, list)  # a name some other code owns
    with pytest.raises(ValueError, match="other code"):
        register_split(taken, base, str(tmp_path / "a.txt"))
    assert taken + "_unlabeled" not in DatasetCatalog.list()  # nothing half-registered
    with pytest.raises(KeyError, match="not registered"):
        register_split(new_name(), "no_such_base_dataset", str(tmp_path / "a.txt"))
    assert [r["image_id"] for r in DatasetCatalog.get(split)] == ["001"]


# ---- COCO json base and the command-line tool ---------------------------------------------------------


def _tiny_coco(root, n=20):
    """A COCO instances json with n 8x8 images (image ids 1..n) and one box each."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, n + 1):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images_dir / f"{i:04d}.jpg")
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "height": 8, "width": 8})
        annotations.append(
            {"id": i, "image_id": i, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}
        )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root / "instances.json", images_dir


def test_split_of_coco_json_copies_metadata_set_at_load(tmp_path, new_name):
    base, split = new_name("coco"), new_name()
    json_file, images = _tiny_coco(tmp_path)
    register_coco_instances(base, {}, str(json_file), str(images))
    write_split_file(tmp_path / "s.txt", ["3", "10"])
    register_split(split, base, str(tmp_path / "s.txt"))
    labeled = DatasetCatalog.get(split)
    assert sorted(r["image_id"] for r in labeled) == [3, 10]
    assert all(len(r["annotations"]) == 1 for r in labeled)
    # load_coco_json sets thing_classes on the base when it is loaded; the split gets them too.
    assert MetadataCatalog.get(split).thing_classes == ["thing"]
    assert MetadataCatalog.get(split).evaluator_type == "coco"
    assert len(DatasetCatalog.get(split + "_unlabeled")) == 18


def _run_make_splits(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_splits.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_make_splits_cli_is_reproducible(tmp_path):
    json_file, images = _tiny_coco(tmp_path / "coco")
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = _run_make_splits(
            "--dataset", "tiny_coco_cli", "--coco-json", str(json_file), "--image-root", str(images),
            "--percent", "10", "12.5", "50", "--seeds", "1", "2", "--output-dir", str(out),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stdout.splitlines() if "pct_seed" in line]
        assert len(lines) == 6 and "2 of 20 images" in lines[0], proc.stdout
        files = sorted(os.listdir(out / "tiny_coco_cli"))
        outputs.append({f: (out / "tiny_coco_cli" / f).read_bytes() for f in files})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == sorted(
        f"{p}pct_seed{s}.txt" for p in ("10", "12.5", "50") for s in (1, 2)
    )
    path = tmp_path / "a" / "tiny_coco_cli" / "12.5pct_seed1.txt"
    ids = read_split_file(path)
    assert len(ids) == 2  # round(2.5) == 2
    assert ids == make_split([str(i) for i in range(1, 21)], 12.5, 1)
    header = read_split_header(path)
    assert header["dataset"] == "tiny_coco_cli" and header["count"] == "2" and header["total"] == "20"


def test_make_splits_cli_unknown_dataset(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_splits", os.path.join(ROOT, "selftrain_d2", "cli", "make_splits.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args(["--dataset", "x", "--preset", "coco"]).percents == [0.4, 1, 2, 5, 10]
    assert tool.parse_args(["--dataset", "x", "--preset", "cityscapes"]).percents == [5, 10, 20, 30]
    with pytest.raises(SystemExit) as err:
        tool.main(["--dataset", "no_such_dataset_xyz", "--percent", "1", "--output-dir", str(tmp_path)])
    assert "no_such_dataset_xyz" in str(err.value.code)
    with pytest.raises(SystemExit):
        tool.parse_args(["--dataset", "x", "--percent", "0"])
    assert "(0, 100]" in capsys.readouterr().err


def test_image_key_is_the_same_for_every_cityscapes_loader():
    from selftrain_d2.data.records import image_key

    semantic = {"file_name": "/d/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"}
    instance = dict(semantic, image_id="aachen_000000_000019_leftImg8bit.png")
    assert image_key(semantic) == image_key(instance) == "aachen_000000_000019"
    assert image_key({"image_id": 139, "file_name": "x/000000000139.jpg"}) == "139"
    assert image_key({"image_id": "sub/dir/img.v2", "file_name": "f/sub/dir/img.v2.jpg"}) == "sub/dir/img.v2"
