import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from selftrain_d2.config import load_config
from selftrain_d2.data import build_mapper
from selftrain_d2.data.build import build_train_loader
from selftrain_d2.data.mappers.semantic import CentroidCrop, CenteredAugInput
from selftrain_d2.data.samplers import (
    ClassUniformCentroids,
    MixedPlan,
    PermutationPlan,
    class_uniform_centroid_draws,
    mixed_epoch_plan,
    plan_stream,
)
from selftrain_d2.data.centroids import (
    CentroidIndex,
    build_centroid_index,
    load_centroid_index,
    region_centroids,
    save_centroid_index,
)

from ..conftest import DEMO_CONFIG


def _label_map():
    """40x60: class 0 everywhere else; class 1 two squares; class 2 a region below min_area; class 4 two
    squares touching at a corner (one 8-connected region); class 5 a band cut in two by ignore pixels."""
    lab = np.zeros((40, 60), np.uint8)
    lab[2:6, 10:14] = 1  # 16 px, centroid (3.5, 11.5)
    lab[20:30, 40:50] = 1  # 100 px, centroid (24.5, 44.5)
    lab[30:32, 5:7] = 2  # 4 px < min_area 5: dropped
    lab[10:13, 30:33] = 4
    lab[13:16, 33:36] = 4  # touches (12, 32) diagonally: one region of 18 px, centroid (12.5, 32.5)
    lab[35:38, :] = 5
    lab[35:38, 30] = 255  # splits the band: (36, 14.5) and (36, 45)
    return lab


def test_region_centroids_on_constructed_label_map():
    lab = _label_map()
    cents = region_centroids(lab, num_classes=6, min_area=5)
    assert len(cents) == 6
    np.testing.assert_allclose(sorted(map(tuple, cents[1])), [(3.5, 11.5), (24.5, 44.5)])
    assert cents[2].shape == (0, 2) and cents[3].shape == (0, 2)
    np.testing.assert_allclose(cents[4], [(12.5, 32.5)])
    np.testing.assert_allclose(sorted(map(tuple, cents[5])), [(36.0, 14.5), (36.0, 45.0)])
    # Background: rows 38-39 are cut off by the band (ignore pixels connect nothing), the rest is one region.
    upper = np.argwhere(lab[:35] == 0).mean(0)
    np.testing.assert_allclose(sorted(map(tuple, cents[0])), sorted([tuple(upper), (38.5, 29.5)]))
    # min_area counts pixels: at 4 the small class-2 region is kept, at 17 the 16-px square is not.
    np.testing.assert_allclose(region_centroids(lab, 6, min_area=4)[2], [(30.5, 5.5)])
    np.testing.assert_allclose(region_centroids(lab, 6, min_area=17)[1], [(24.5, 44.5)])
    with pytest.raises(ValueError, match="id 5 outside the 5 classes"):
        region_centroids(lab, num_classes=5, min_area=5)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_index_build_skips_unreadable_save_load_and_align(tmp_path, caplog):
    lab = _label_map()
    flipped = lab[:, ::-1].copy()
    (tmp_path / "broken.png").write_text("not a png")
    records = [
        {"file_name": "a.jpg", "sem_seg_file_name": _png(tmp_path / "a.png", lab)},
        {"file_name": "b.jpg", "sem_seg_file_name": str(tmp_path / "broken.png")},
        {"file_name": "c.jpg", "sem_seg_file_name": _png(tmp_path / "c.png", flipped)},
    ]
    with caplog.at_level(logging.WARNING):
        index = build_centroid_index(records, num_classes=6, min_area=5)
    assert "1 of 3 label files were unreadable" in caplog.text and "broken.png" in caplog.text
    assert index.skipped == [str(tmp_path / "broken.png")] and index.num_images == 3
    assert index.image.dtype == np.int32 and index.cls.dtype == np.uint16 and index.y.dtype == np.uint16
    per_image = np.bincount(index.image, minlength=3)
    assert per_image.tolist() == [7, 0, 7]  # 2 (class 0) + 2 (class 1) + 1 (4) + 2 (5), none for the broken file
    rows = {(int(c), int(y), int(x)) for i, c, y, x in zip(index.image, index.cls, index.y, index.x) if i == 2}
    # The mirror image's centroids, rounded half to even: (3.5, 59 - 11.5) -> (4, 48).
    assert {(1, 4, 48), (1, 24, 14), (4, 12, 26), (5, 36, 44), (5, 36, 14)} <= rows
    assert index.class_counts().tolist() == [4, 4, 0, 0, 2, 4]

    path = tmp_path / "idx" / "centroids.npz"
    save_centroid_index(index, path)
    loaded = load_centroid_index(path, num_classes=6)
    for field in ("image", "cls", "y", "x"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(index, field))
    assert loaded.files == index.files and loaded.skipped == index.skipped and loaded.min_area == 5
    assert [p.name for p in (tmp_path / "idx").iterdir()] == ["centroids.npz"]  # no temporary left behind

    with pytest.raises(ValueError, match="built for 6 classes, but the model has 19"):
        load_centroid_index(path, num_classes=19)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.npz"):
        load_centroid_index(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_centroid_index(tmp_path / "nothere.npz")

    # Aligned to the same records in another order, image ids follow the records.
    reordered = [records[2], records[0], records[1]]
    aligned = loaded.aligned_to(reordered)
    np.testing.assert_array_equal(aligned.image, np.array([1, -1, 0])[index.image])
    with pytest.raises(ValueError, match="idx.npz lists 1 label files that are not in demo_x.*c.png"):
        loaded.aligned_to(records[:2], source="idx.npz", dataset="demo_x")


def _skewed_index():
    """Class 0: 1000 centroids, class 1: 10, class 2: 1, class 3: none."""
    cls = np.array([0] * 1000 + [1] * 10 + [2], np.int64)
    n = len(cls)
    return CentroidIndex(np.arange(n) % 7, cls, np.arange(n) // 60, np.arange(n) % 60, [f"{i}.png" for i in range(7)],
                         num_classes=4, min_area=1)


def test_class_uniform_draws_are_uniform_over_classes_then_centroids():
    index = _skewed_index()
    rows = class_uniform_centroid_draws(index, 30000, np.random.default_rng(0))
    freq = np.bincount(index.cls[rows], minlength=4) / len(rows)
    np.testing.assert_allclose(freq[:3], [1 / 3] * 3, atol=0.015)
    assert freq[3] == 0
    per_centroid = np.bincount(rows[index.cls[rows] == 1] - 1000, minlength=10)
    assert per_centroid.min() > 800 and per_centroid.max() < 1200  # ~1000 each
    again = class_uniform_centroid_draws(ClassUniformCentroids(index), 30000, np.random.default_rng(0))
    np.testing.assert_array_equal(rows, again)


@pytest.mark.parametrize("ratio", [1, 3, 7])
def test_mixed_plan_counts_per_epoch(ratio):
    plan = MixedPlan(10, 37, pseudo_ratio=ratio)
    assert plan.epoch_size == 10 + 10 * ratio
    for epoch in range(3):
        p = plan.epoch(seed=4, epoch=epoch)
        real, pseudo = p.index[p.index < 10], p.index[p.index >= 10]
        assert sorted(real.tolist()) == list(range(10)) and len(pseudo) == 10 * ratio
        assert (pseudo < 47).all() and (p.center == -1).all() and (p.cls == -1).all()
        assert p.index[:10].max() >= 10  # shuffled together, not real first
    # Pseudo images are drawn without replacement, cycling through the pool across epochs: 37 epochs
    # hold 370 * ratio draws = 10 * ratio passes over the 37 images.
    draws = np.concatenate([plan.epoch(4, e).index for e in range(37)])
    assert np.bincount(draws[draws >= 10] - 10).tolist() == [10 * ratio] * 37
    two = np.concatenate([plan.epoch(4, e).index for e in range(2)])
    counts = np.bincount(two[two >= 10] - 10, minlength=37)
    assert counts.max() - counts.min() <= 1


def test_duplicate_real_baseline_and_determinism():
    dup = MixedPlan(10, 0, pseudo_ratio=0, real_repeat=2).epoch(1, 0)
    assert np.bincount(dup.index).tolist() == [2] * 10
    both = MixedPlan(10, 5, pseudo_ratio=1.5, real_repeat=2)
    p = both.epoch(1, 0)
    assert both.epoch_size == len(p) == 50 and (p.index < 10).sum() == 20
    same = mixed_epoch_plan(1, 0, num_real=10, num_pseudo=5, pseudo_ratio=1.5, real_repeat=2)
    np.testing.assert_array_equal(p.index, same.index)
    assert not np.array_equal(p.index, both.epoch(1, 1).index)
    assert not np.array_equal(p.index, both.epoch(2, 0).index)
    with pytest.raises(ValueError, match="no pseudo labels"):
        MixedPlan(10, 0, pseudo_ratio=1.0)
    with pytest.raises(ValueError, match="positive integer"):
        MixedPlan(10, 3, real_repeat=0)


def test_mixed_plan_with_centroids_and_resumed_stream():
    index = _skewed_index()
    plan = MixedPlan(4, 7, pseudo_ratio=7, pseudo_centroids=index)
    p = plan.epoch(9, 0)
    pseudo = p.index >= 4
    assert pseudo.sum() == 28 and (p.center[~pseudo] == -1).all() and (p.cls[~pseudo] == -1).all()
    np.testing.assert_array_equal(p.index[pseudo] - 4, index.image[_rows_of(index, p, pseudo)])
    freq = np.bincount(np.concatenate([plan.epoch(9, e).cls for e in range(300)]) + 1, minlength=4)[1:]
    np.testing.assert_allclose(freq / freq.sum(), [1 / 3] * 3, atol=0.03)

    stream = plan_stream(plan, seed=9)
    full = [next(stream) for _ in range(80)]
    assert full[0][1].center is not None or full[0][1].index < 4
    resumed = plan_stream(plan, seed=9, start=45)
    assert [next(resumed) for _ in range(35)] == full[45:]
    plain = plan_stream(PermutationPlan(5), seed=3, start=2)
    assert [e.center for _, e in (next(plain) for _ in range(4))] == [None] * 4


def _rows_of(index, plan, mask):
    """Index rows matching the plan's (class, y, x), checking the centres are real centroids."""
    keys = {(int(c), int(y), int(x)): r for r, (c, y, x) in enumerate(zip(index.cls, index.y, index.x))}
    return [keys[(int(c), int(y), int(x))] for c, (y, x) in zip(plan.cls[mask], plan.center[mask])]


# --- mapper ---------------------------------------------------------------------------------------


def _coordinate_image(tmp_path, h=64, w=96):
    """An RGB image whose red channel is the row and green the column; label: class 1 left, 2 right."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)
    lab = np.where(xx < w // 2, 1, 2).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "coords.png")
    return {"file_name": str(tmp_path / "coords.png"), "sem_seg_file_name": _png(tmp_path / "coords_lab.png", lab),
            "height": h, "width": w}


def _cfg(*opts):
    return load_config(DEMO_CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(32, 48)",
                                     "INPUT.RANDOM_FLIP", "none", *opts])


def test_mapper_crops_around_the_centre(tmp_path):
    record = _coordinate_image(tmp_path)
    mapper = build_mapper(_cfg("DATALOADER.CENTROID_SAMPLING.JITTER", "0.0"), is_train=True)
    out = mapper(dict(record, crop_center=(40, 70)))
    assert out["image"].shape == (3, 32, 48)
    # Window top-left (40 - 16, 70 - 24): the centre sits in the window's middle.
    assert out["image"][0, 0, 0] == 24 and out["image"][1, 0, 0] == 46
    near_edge = mapper(dict(record, crop_center=(2, 94)))["image"]
    assert near_edge[0, 0, 0] == 0 and near_edge[1, 0, 0] == 96 - 48  # kept inside the image

    doubled = build_mapper(_cfg("INPUT.MIN_SIZE_TRAIN", "(128,)", "DATALOADER.CENTROID_SAMPLING.JITTER", "0.0"), True)
    img = doubled(dict(record, crop_center=(40, 70)))["image"]
    assert img.shape == (3, 32, 48)
    assert abs(int(img[0, 16, 24]) - 40) <= 1 and abs(int(img[1, 16, 24]) - 70) <= 1  # centre scaled with the image

    jittered = build_mapper(_cfg("DATALOADER.CENTROID_SAMPLING.JITTER", "0.2"), is_train=True)
    corners = set()
    for seed in range(40):
        np.random.seed(seed)
        img = jittered(dict(record, crop_center=(30, 50)))["image"]
        y0, x0 = int(img[0, 0, 0]), int(img[1, 0, 0])
        assert y0 <= 30 < y0 + 32 and x0 <= 50 < x0 + 48  # the centroid stays in the crop
        assert abs(y0 + 16 - 30) <= 0.2 * 32 + 1 and abs(x0 + 24 - 50) <= 0.2 * 48 + 1
        corners.add((y0, x0))
    assert len(corners) > 10


def test_crop_without_centre_draws_like_the_category_area_crop():
    from detectron2.data import transforms as T

    rng = np.random.default_rng(0)
    image, sem_seg = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), rng.integers(0, 3, (50, 70)).astype(np.uint8)
    area = T.RandomCrop_CategoryAreaConstraint("absolute", (20, 30), 0.5, 255)
    wrapped = CentroidCrop("absolute", (20, 30), 0.2, fallback=area)
    np.random.seed(5)
    a = area.get_transform(image, sem_seg)
    np.random.seed(5)
    b = wrapped(CenteredAugInput(image, sem_seg=sem_seg))
    assert (a.x0, a.y0, a.w, a.h) == (b.x0, b.y0, b.w, b.h)


def test_photometric_augmentations_default_off_and_deterministic(tmp_path):
    record = _coordinate_image(tmp_path)
    default = build_mapper(_cfg(), is_train=True)
    assert [type(a).__name__ for a in default.augmentations.augs] == ["ResizeShortestEdge", "CentroidCrop"]

    def run(mapper, seed):
        np.random.seed(seed)
        return mapper(record)

    base = run(default, 3)
    jitter = build_mapper(_cfg("INPUT.COLOR_JITTER", "0.4"), is_train=True)
    j1, j2 = run(jitter, 3), run(jitter, 3)
    assert torch.equal(j1["image"], j2["image"]) and torch.equal(j1["sem_seg"], base["sem_seg"])
    assert not torch.equal(j1["image"], base["image"])
    blur = run(build_mapper(_cfg("INPUT.GAUSSIAN_BLUR", "1.0", "INPUT.GAUSSIAN_BLUR_SIGMA", "(2.0, 2.0)"), True), 3)
    assert torch.equal(blur["sem_seg"], base["sem_seg"])
    # The coordinate ramps are linear, so blurring only changes the image near its border.
    diff = (blur["image"].int() - base["image"].int()).abs()
    assert diff.sum() > 0 and diff[:2, 8:-8, 8:-8].max() <= 1


# --- the training loader with real + pseudo datasets -----------------------------------------------


def _register(name, tmp_path, n, rare_at=None):
    """n 64x96 images: class 0 top half, class 2 bottom half, optionally a 6x6 class-7 square at rare_at."""
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = _png(tmp_path / f"{name}_{i}.jpg", rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
        lab = np.zeros((64, 96), np.uint8)
        lab[32:] = 2
        if rare_at is not None:
            y, x = rare_at
            lab[y:y + 6, x + i:x + i + 6] = 7
        records.append({"file_name": img, "sem_seg_file_name": _png(tmp_path / f"{name}_{i}.png", lab),
                        "height": 64, "width": 96, "image_id": f"{name}_{i}"})
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=[str(c) for c in range(10)], ignore_label=255)
    return records


def _loader_cfg(real, pseudo, *opts):
    cfg = _cfg("DATASETS.TRAIN", f"('{real}',)", "DATASETS.TRAIN_PSEUDO", f"('{pseudo}',)",
               "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0", "SEED", "3", *opts)
    cfg.freeze()
    return cfg


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _summary(batches):
    return [(s["file_name"], s.get("crop_center"), s["image"].sum().item()) for b in batches for s in b]


def test_loader_mixes_real_and_pseudo_and_crops_at_centroids(tmp_path, new_name, caplog):
    real, pseudo = new_name("real"), new_name("pseudo")
    real_records = _register(real, tmp_path, 4)
    pseudo_records = _register(pseudo, tmp_path, 6, rare_at=(10, 70))
    index_file = tmp_path / "pseudo_centroids.npz"
    save_centroid_index(build_centroid_index(pseudo_records, 10, 16), index_file)
    cfg = _loader_cfg(real, pseudo, "DATALOADER.PSEUDO_RATIO", "3.0", "DATALOADER.CENTROID_SAMPLING.ENABLED", "True",
                      "DATALOADER.CENTROID_SAMPLING.INDEX_FILES", f"[['{pseudo}', '{index_file}']]")
    with caplog.at_level(logging.INFO):
        batches = _take(build_train_loader(cfg), 8)  # 2 epochs of 4 real + 12 pseudo samples
    assert "4 real samples" in caplog.text and "12 pseudo samples" in caplog.text
    real_files = {r["file_name"] for r in real_records}
    pseudo_labels = {r["file_name"]: np.array(Image.open(r["sem_seg_file_name"])) for r in pseudo_records}
    for epoch in (batches[:4], batches[4:]):
        samples = [s for b in epoch for s in b]
        assert sorted(s["file_name"] for s in samples if s["file_name"] in real_files) == sorted(real_files)
        drawn = [s for s in samples if s["file_name"] in pseudo_labels]
        assert len(drawn) == 12 and all("crop_center" not in s for s in samples if s["file_name"] in real_files)
        for s in drawn:
            y, x = s["crop_center"]
            cls = pseudo_labels[s["file_name"]][y, x]
            assert cls in s["sem_seg"].unique().tolist()  # the centroid's class is in the crop
    classes = [pseudo_labels[s["file_name"]][tuple(s["crop_center"])] for b in batches for s in b if "crop_center" in s]
    assert set(classes) == {0, 2, 7} and classes.count(7) >= 3  # the rare class is drawn like the others

    # Resuming at iteration 5 repeats the batches; so does a loader with 2 worker processes.
    loader = build_train_loader(cfg)
    loader.set_start_iter(5)
    assert _summary(_take(loader, 3)) == _summary(batches[5:8])
    workers = build_train_loader(_loader_cfg(
        real, pseudo, "DATALOADER.PSEUDO_RATIO", "3.0", "DATALOADER.CENTROID_SAMPLING.ENABLED", "True",
        "DATALOADER.NUM_WORKERS", "2"))  # no index file: built in memory, same centroids
    assert _summary(_take(workers, 4)) == _summary(batches[:4])


def test_loader_config_errors_name_the_key(tmp_path, new_name):
    real, pseudo = new_name("real"), new_name("pseudo")
    _register(real, tmp_path, 2)
    _register(pseudo, tmp_path, 2)
    with pytest.raises(ValueError, match="INDEX_FILES names dataset 'other'"):
        build_train_loader(_loader_cfg(real, pseudo, "DATALOADER.CENTROID_SAMPLING.ENABLED", "True",
                                       "DATALOADER.CENTROID_SAMPLING.INDEX_FILES", "[['other', 'x.npz']]"))
    with pytest.raises(ValueError, match="APPLY_TO must be"):
        build_train_loader(_loader_cfg(real, pseudo, "DATALOADER.CENTROID_SAMPLING.APPLY_TO", "some"))
    with pytest.raises(ValueError, match="JITTER must be in"):
        build_train_loader(_loader_cfg(real, pseudo, "DATALOADER.CENTROID_SAMPLING.ENABLED", "True",
                                       "DATALOADER.CENTROID_SAMPLING.JITTER", "0.5"))
    # Without pseudo labels or repeats the plan is the plain permutation, as before.
    plain = load_config(DEMO_CONFIG, ["DATASETS.TRAIN", f"('{real}',)"])
    assert isinstance(build_train_loader(plain).dataset.plan, PermutationPlan)
    # REAL_REPEAT alone (the duplicate-real baseline) ignores PSEUDO_RATIO: there is nothing to draw from.
    repeat = load_config(DEMO_CONFIG, ["DATASETS.TRAIN", f"('{real}',)", "DATALOADER.REAL_REPEAT", "3"])
    assert build_train_loader(repeat).dataset.plan.epoch_size == 2 * 3
