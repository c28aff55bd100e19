import logging

import numpy as np
import pytest
import torch
from PIL import Image

from selftrain_d2.config import load_config
from selftrain_d2.data import MAPPER_REGISTRY, build_mapper
from selftrain_d2.data.build import SeededTrainStream, permutation_stream
from selftrain_d2.data.image_io import LabelValueError, UnreadableImageError, read_image, read_sem_seg

from .conftest import DEMO_CONFIG


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
