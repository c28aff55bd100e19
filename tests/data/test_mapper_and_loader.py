import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from selftrain_d2.config import load_config
from selftrain_d2.data import MAPPER_REGISTRY, build_mapper
from selftrain_d2.data.build import SeededTrainStream, permutation_stream
from selftrain_d2.data.image_io import (DecodeCache, LabelValueError, UnreadableImageError, read_image,
                                        read_sem_seg)

from ..conftest import DEMO_CONFIG


def _write_pair(tmp_path, name, label_value=3, size=(64, 96)):
    h, w = size
    rng = np.random.default_rng(0)
    img = tmp_path / f"{name}.jpg"
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img)
    lab = np.full((h, w), label_value, np.uint8)
    lab[: h // 2] = 1
    lab[0, 0] = 255
    png = tmp_path / f"{name}.png"
    Image.fromarray(lab).save(png)
    return {"file_name": str(img), "sem_seg_file_name": str(png), "height": h, "width": w, "image_id": name}


def _cfg(*opts):
    return load_config(DEMO_CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(48, 80)", *opts])


def test_semantic_mapper_train_output(tmp_path):
    record = _write_pair(tmp_path, "a")
    mapper = build_mapper(_cfg(), is_train=True)
    out = mapper(record)
    assert out["image"].shape == (3, 48, 80) and out["image"].dtype == torch.uint8
    assert out["sem_seg"].shape == (48, 80) and out["sem_seg"].dtype == torch.int64
    assert set(out["sem_seg"].unique().tolist()) <= {1, 3, 255}
    assert "sem_seg_file_name" in record  # the dataset dict is not modified


def test_semantic_mapper_test_mode_reads_no_label(tmp_path):
    record = _write_pair(tmp_path, "a", label_value=200)  # a bad label is not even read
    out = build_mapper(_cfg(), is_train=False)(record)
    assert out["image"].shape[-2:] == (128, 192) and "sem_seg" not in out


def test_label_ids_outside_class_list_name_the_file(tmp_path):
    record = _write_pair(tmp_path, "bad", label_value=42)
    with pytest.raises(LabelValueError) as e:
        build_mapper(_cfg(), is_train=True)(record)
    assert "bad.png" in str(e.value) and "42" in str(e.value) and "10 classes" in str(e.value)
    with pytest.raises(LabelValueError):
        read_sem_seg(record["sem_seg_file_name"], num_classes=10)


def test_truncated_and_missing_images_name_the_file(tmp_path):
    record = _write_pair(tmp_path, "trunc")
    data = open(record["file_name"], "rb").read()
    open(record["file_name"], "wb").write(data[: len(data) // 3])
    with pytest.raises(UnreadableImageError) as e:
        read_image(record["file_name"])
    assert "trunc.jpg" in str(e.value)
    with pytest.raises(UnreadableImageError, match="missing.jpg"):
        read_image(str(tmp_path / "missing.jpg"))
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(UnreadableImageError, match="text.jpg"):
        read_image(str(tmp_path / "text.jpg"))


def test_decode_cache_keeps_the_most_recent_arrays_within_its_bytes():
    cache = DecodeCache(300)
    loads = []

    def loader(key, nbytes):
        return lambda: loads.append(key) or np.full(nbytes, len(loads), np.uint8)

    a = cache.get("a", loader("a", 100))
    assert not a.flags.writeable  # cached arrays are read-only
    cache.get("b", loader("b", 100))
    assert cache.get("a", loader("a", 100)) is a  # a hit: not loaded again, now the most recent
    cache.get("c", loader("c", 150))  # 350 bytes > 300: "b", the least recently used, goes
    assert len(cache) == 2 and cache.nbytes == 250
    cache.get("b", loader("b", 100))
    assert loads == ["a", "b", "c", "b"] and (cache.hits, cache.misses) == (1, 4)
    big = cache.get("big", loader("big", 400))  # larger than the whole cache: returned, not kept
    assert big.flags.writeable and "big" not in cache._items
    off = DecodeCache(0)
    off.get("a", loader("a", 10))
    off.get("a", loader("a", 10))
    assert len(off) == 0 and loads[-2:] == ["a", "a"]


def test_semantic_mapper_decode_cache_gives_the_same_samples(tmp_path):
    import random

    records = [_write_pair(tmp_path, f"img{i}", label_value=2 + i) for i in range(3)]
    augment = ["INPUT.COLOR_JITTER", "0.3", "INPUT.GAUSSIAN_BLUR", "0.5"]  # every transform on the cached arrays
    plain = build_mapper(_cfg("DATALOADER.DECODE_CACHE_MB", "0", *augment), is_train=True)
    cached = build_mapper(_cfg("DATALOADER.DECODE_CACHE_MB", "1", *augment), is_train=True)
    assert plain.cache is None and cached.cache.capacity == 2**20

    def epoch(mapper, e):
        out = []
        for i, record in enumerate(records):
            np.random.seed(10 * e + i)
            random.seed(10 * e + i)
            out.append(mapper(record))
        return out

    expected = [epoch(plain, e) for e in range(2)]
    got = [epoch(cached, 0)]
    for record in records:  # the second epoch reads nothing from disk
        os.remove(record["file_name"])
        os.remove(record["sem_seg_file_name"])
    got.append(epoch(cached, 1))
    for ref_epoch, got_epoch in zip(expected, got):
        for ref, out in zip(ref_epoch, got_epoch):
            assert torch.equal(ref["image"], out["image"]) and torch.equal(ref["sem_seg"], out["sem_seg"])
    assert (cached.cache.hits, cached.cache.misses, len(cached.cache)) == (6, 6, 6)
    # Label ids are checked on the way in, so a bad label map still names its file.
    bad = _write_pair(tmp_path, "bad", label_value=42)
    with pytest.raises(LabelValueError, match="bad.png"):
        cached(bad)


def test_mapper_registry_chooses_by_name(tmp_path):
    @MAPPER_REGISTRY.register("test_identity_mapper")
    class Identity:
        def __init__(self, cfg, is_train):
            self.is_train = is_train

        def __call__(self, d):
            return d

    try:
        mapper = build_mapper(_cfg("INPUT.DATASET_MAPPER_NAME", "test_identity_mapper"), is_train=False)
        assert isinstance(mapper, Identity) and mapper.is_train is False
    finally:
        MAPPER_REGISTRY._obj_map.pop("test_identity_mapper")


def test_permutation_stream_epochs_and_start():
    full = [next(s) for s in [permutation_stream(5, seed=3, shuffle=True)] for _ in range(12)]
    assert sorted(i for _, i in full[:5]) == list(range(5)) and sorted(i for _, i in full[5:10]) == list(range(5))
    assert [p for p, _ in full] == list(range(12))
    resumed = permutation_stream(5, seed=3, shuffle=True, start=7)
    assert [next(resumed) for _ in range(5)] == full[7:12]


class _Echo:
    """A mapper whose output records the index and the NumPy draw made under the stream's seeding."""

    def __call__(self, d):
        if d["idx"] == 3:
            raise UnreadableImageError(f"img{d['idx']}.jpg", "truncated")
        return {"idx": d["idx"], "draw": float(np.random.rand()), "image": torch.zeros(3, 4, 4)}


def _batches(stream, n, num_workers=0):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    it = iter(loader)
    return [[(s["idx"], s["draw"]) for s in next(it)] for _ in range(n)]


def test_stream_skips_and_reports_unreadable_images(caplog):
    data = [{"idx": i} for i in range(11)]
    with caplog.at_level(logging.WARNING):
        batches = _batches(SeededTrainStream(data, _Echo(), batch_size=2, seed=5), 8)
    assert "img3.jpg" in caplog.text
    seen = [idx for b in batches for idx, _ in b]
    assert 3 not in seen and set(seen) == set(range(11)) - {3}
    with pytest.raises(UnreadableImageError):
        _batches(SeededTrainStream(data, _Echo(), batch_size=2, seed=5, skip_unreadable=False), 8)


def test_stream_resume_and_workers_repeat_the_same_batches():
    data = [{"idx": i} for i in range(20) if i != 3]
    make = lambda: SeededTrainStream(data, _Echo(), batch_size=2, seed=5)  # noqa: E731
    reference = _batches(make(), 9)
    assert _batches(make(), 9, num_workers=2) == reference
    resumed = make()
    resumed.set_start_iter(4)
    assert _batches(resumed, 5) == reference[4:]
    other_seed = make()
    other_seed.set_start_iter(0, seed=6)
    assert _batches(other_seed, 3) != reference[:3]


def test_ranks_partition_the_global_stream():
    data = [{"idx": i} for i in range(20) if i != 3]
    single = [i for b in _batches(SeededTrainStream(data, _Echo(), batch_size=4, seed=1), 4) for i, _ in b]
    ranks = [
        _batches(SeededTrainStream(data, _Echo(), batch_size=2, seed=1, rank=r, world_size=2), 4) for r in range(2)
    ]
    both = sorted(i for r in ranks for b in r for i, _ in b)
    assert both == sorted(single)
