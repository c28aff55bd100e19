"""The embedded demo data: determinism, label / instance consistency, domains, imbalance, registration
and generation that is never half-done. Everything runs on a few images in a temporary root."""
import json
import os
import shutil
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from selftrain_d2.data.demo import (
    CITY_CLASSES,
    DOMAIN_CLASSES,
    DOMAIN_THING_CLASSES,
    DOMAINS,
    GENERATOR_VERSION,
    IGNORE_LABEL,
    RURAL_CLASSES,
    SPLITS,
    demo_dataset_names,
    demo_root,
    ensure_demo_data,
    generate_demo_data,
    register_demo_datasets,
)
from selftrain_d2.data.demo import store
from selftrain_d2.data.demo.store import is_complete, resolve_counts
from selftrain_d2.data.demo.writer import image_id, render_scene

N = 3  # images per split in the generated test roots


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return generate_demo_data(tmp_path_factory.mktemp("demo") / "root", counts=N)


def _split_dirs(root):
    for domain in DOMAINS:
        for split in SPLITS:
            yield domain, split, root / domain / split


def _read_label(path):
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert label is not None, path
    return label


def test_class_lists():
    assert CITY_CLASSES == ("road", "sidewalk", "building", "vegetation", "sky", "pole", "traffic sign", "car",
                            "person", "bicycle")
    assert RURAL_CLASSES == CITY_CLASSES + ("terrain", "truck")
    assert DOMAIN_THING_CLASSES == {
        "city": ("car", "person", "bicycle"),
        "rural": ("car", "person", "bicycle", "truck"),
    }


def test_layout_and_formats(small_root):
    manifest = json.loads((small_root / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION
    for domain, split, d in _split_dirs(small_root):
        images = sorted((d / "images").glob("*.jpg"))
        labels = sorted((d / "sem_seg").glob("*.png"))
        assert [p.stem for p in images] == [image_id(domain, split, i) for i in range(N)]
        assert [p.stem for p in labels] == [p.stem for p in images]
        img = cv2.imread(str(images[0]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (128, 256, 3) and img.dtype == np.uint8
        label = _read_label(labels[0])
        assert label.shape == (128, 256) and label.dtype == np.uint8
        stats = json.loads((d / "stats.json").read_text())
        hist = sum(np.bincount(_read_label(p).ravel(), minlength=256) for p in labels)
        assert stats["pixel_counts"] == {c: int(hist[i]) for i, c in enumerate(DOMAIN_CLASSES[domain])}
        assert stats["ignore_pixels"] == int(hist[IGNORE_LABEL])
        assert stats["total_pixels"] == N * 128 * 256


def test_generation_is_deterministic(small_root, tmp_path):
    # a second generation, this time in two worker processes: same bytes for labels and JSON
    again = generate_demo_data(tmp_path / "again", counts=N, workers=2)
    for domain, split, d in _split_dirs(small_root):
        other = again / domain / split
        for name in ("instances.json", "stats.json"):
            assert (d / name).read_bytes() == (other / name).read_bytes(), (domain, split, name)
        for p in sorted((d / "sem_seg").glob("*.png")):
            assert p.read_bytes() == (other / "sem_seg" / p.name).read_bytes(), p
        for p in sorted((d / "images").glob("*.jpg")):
            assert np.array_equal(cv2.imread(str(p)), cv2.imread(str(other / "images" / p.name))), p
    assert (small_root / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()


def test_each_image_reproducible_on_its_own(small_root):
    scene = render_scene("rural", "val", 2)
    on_disk = _read_label(small_root / "rural" / "val" / "sem_seg" / "rural_val_0002.png")
    assert np.array_equal(scene.label, on_disk)
    assert not np.array_equal(render_scene("rural", "val", 1).label, on_disk)


def test_labels_hold_valid_ids_and_some_ignore(small_root):
    for domain, _split, d in _split_dirs(small_root):
        valid = set(range(len(DOMAIN_CLASSES[domain]))) | {IGNORE_LABEL}
        seen = set()
        for p in (d / "sem_seg").glob("*.png"):
            seen |= set(np.unique(_read_label(p)).tolist())
        assert seen <= valid, (domain, sorted(seen - valid))
        assert IGNORE_LABEL in seen


def test_instances_match_semantic_labels(small_root):
    for domain, _split, d in _split_dirs(small_root):
        coco = COCO(str(d / "instances.json"))
        things = DOMAIN_THING_CLASSES[domain]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(things)
        assert coco.getCatIds() == list(range(1, len(things) + 1))
        train_id = {k + 1: DOMAIN_CLASSES[domain].index(name) for k, name in enumerate(things)}
        for img in coco.loadImgs(coco.getImgIds()):
            assert isinstance(img["id"], str)
            label = _read_label(d / "sem_seg" / f"{img['id']}.png")
            union = {cls: np.zeros(label.shape, bool) for cls in train_id.values()}
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                cls = train_id[ann["category_id"]]
                assert ann["iscrowd"] == 0 and ann["area"] == int(mask.sum()) >= 12
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                # every visible pixel of the instance carries its class in the PNG (or ignore)
                assert np.all((label[mask] == cls) | (label[mask] == IGNORE_LABEL))
                assert not (union[cls] & mask).any(), "instances of one class overlap"
                union[cls] |= mask
            for cls, pixels in union.items():  # and every thing pixel of the PNG belongs to an instance
                assert np.array_equal(label == cls, pixels), (img["id"], cls)


def test_detectron2_loads_instances(small_root):
    d = small_root / "rural" / "val"
    dicts = load_coco_json(str(d / "instances.json"), str(d / "images"))
    assert [r["image_id"] for r in dicts] == [image_id("rural", "val", i) for i in range(N)]
    assert all(os.path.isfile(r["file_name"]) for r in dicts)
    anns = [a for r in dicts for a in r["annotations"]]
    assert anns and all(isinstance(a["segmentation"], dict) for a in anns)


def test_rural_has_its_own_classes_and_city_never():
    terrain, truck = RURAL_CLASSES.index("terrain"), RURAL_CLASSES.index("truck")
    rural = [render_scene("rural", "unlabeled", i).label for i in range(8)]
    assert sum((lab == terrain).any() for lab in rural) >= 6
    assert sum((lab == truck).any() for lab in rural) >= 1
    for i in range(8):
        label = render_scene("city", "unlabeled", i).label
        assert label[label != IGNORE_LABEL].max() < len(CITY_CLASSES)


def test_class_imbalance():
    hist = sum(np.bincount(render_scene("city", "unlabeled", i).label.ravel(), minlength=256) for i in range(40))
    share = hist[: len(CITY_CLASSES)] / hist[: len(CITY_CLASSES)].sum()
    shares = dict(zip(CITY_CLASSES, share))
    assert min(shares.values()) < 0.01, shares
    assert all(shares[c] > 0 for c in CITY_CLASSES), shares
    for big in ("road", "building"):
        assert shares[big] > 0.10, shares


@pytest.fixture
def restore_registration():
    before = MetadataCatalog.get(demo_dataset_names()[0]).get("demo_root")
    yield
    register_demo_datasets(before)  # later tests see the registrations they saw before


def test_registration_is_lazy_and_follows_the_env(monkeypatch, tmp_path, restore_registration):
    missing = tmp_path / "not_generated_yet"
    monkeypatch.setenv("SELFTRAIN_DEMO_ROOT", str(missing))
    assert demo_root() == missing
    names = register_demo_datasets()
    assert register_demo_datasets() == names  # idempotent
    assert not missing.exists()  # nothing generated until a dataset is loaded
    meta = MetadataCatalog.get("demo_city_val_sem_seg")
    assert meta.sem_seg_root == str(missing / "city" / "val" / "sem_seg")
    assert meta.ignore_label == IGNORE_LABEL and meta.evaluator_type == "sem_seg"
    assert meta.stuff_classes == list(CITY_CLASSES) and len(meta.stuff_colors) == len(CITY_CLASSES)
    meta = MetadataCatalog.get("demo_rural_unlabeled_instance")
    assert meta.heldout_json_file == str(missing / "rural" / "unlabeled" / "instances.json")
    assert meta.thing_classes == list(DOMAIN_THING_CLASSES["rural"])
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
    assert "json_file" not in meta.as_dict()


def test_registered_loaders(monkeypatch, small_root, restore_registration):
    monkeypatch.setenv("SELFTRAIN_DEMO_ROOT", str(small_root))
    register_demo_datasets()
    for domain in DOMAINS:
        for split in SPLITS:
            sem = DatasetCatalog.get(f"demo_{domain}_{split}_sem_seg")
            ins = DatasetCatalog.get(f"demo_{domain}_{split}_instance")
            ids = [image_id(domain, split, i) for i in range(N)]
            assert [r["image_id"] for r in sem] == ids == [r["image_id"] for r in ins]
            for r in sem + ins:
                assert os.path.isfile(r["file_name"]) and (r["height"], r["width"]) == (128, 256)
            if split == "unlabeled":
                assert all("sem_seg_file_name" not in r and "annotations" not in r for r in sem + ins)
                meta = MetadataCatalog.get(f"demo_{domain}_{split}_sem_seg")
                assert os.path.isdir(meta.heldout_sem_seg_root)
                assert os.path.isfile(MetadataCatalog.get(f"demo_{domain}_{split}_instance").heldout_json_file)
            else:
                assert all(os.path.isfile(r["sem_seg_file_name"]) for r in sem)
                assert all("annotations" in r for r in ins)
                assert sum(len(r["annotations"]) for r in ins) > 0


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "root"
    real = store.write_splits

    def dies_halfway(jobs, workers=None):
        real(jobs[:1], workers)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store, "write_splits", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(root, counts=1)
    assert not root.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".root.tmp")] == []


def test_leftover_temporary_folder_is_not_taken_as_done(small_root, tmp_path):
    root = tmp_path / "root"
    # what a killed generator leaves behind: a temporary sibling, here even holding a manifest
    leftover = tmp_path / f".root.tmp-{socket.gethostname()}-{_dead_pid()}-0123abcd"
    shutil.copytree(small_root, leftover)
    assert not is_complete(root)
    assert ensure_demo_data(root, counts=1) == root
    assert is_complete(root) and json.loads((root / "manifest.json").read_text())["counts"] == resolve_counts(1)
    assert not leftover.exists()  # cleaned up: its process is gone
    assert ensure_demo_data(root) == root  # reused, not regenerated
    with pytest.raises(ValueError):
        ensure_demo_data(root, counts=2)


def test_incomplete_root_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "city").mkdir(parents=True)  # a half-written folder under the root's own name
    with pytest.raises(RuntimeError, match="not complete demo data"):
        ensure_demo_data(root, counts=1)
    assert (root / "city").is_dir()  # never deleted


def test_losing_the_race_discards_our_copy(small_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_root, root)  # another process finished first
    before = (root / "manifest.json").read_bytes()
    assert store._build_and_publish(root, resolve_counts(1), 0) is False
    assert (root / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".root.tmp")] == []


def test_counts_and_root_resolution(monkeypatch):
    assert resolve_counts(None) == {"city": {"labeled": 20, "unlabeled": 400, "val": 100},
                                    "rural": {"labeled": 20, "unlabeled": 300, "val": 100}}
    assert resolve_counts({"val": 5})["rural"] == {"labeled": 20, "unlabeled": 300, "val": 5}
    assert resolve_counts({"city": {"unlabeled": 0}})["city"]["unlabeled"] == 0
    with pytest.raises(ValueError):
        resolve_counts({"town": {"val": 1}})
    monkeypatch.delenv("SELFTRAIN_DEMO_ROOT", raising=False)
    assert demo_root().parts[-4:] == (".cache", "selftrain_d2", "demo", f"v{GENERATOR_VERSION}")
