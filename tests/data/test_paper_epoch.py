"""The self-training paper's epoch (sections 3.2-3.3, Table 2): a fixed share of the real images per epoch plus
ratio x that many pseudo samples, and the duplicate-real baseline of the same epoch length."""
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from selftrain_d2.config import load_config
from selftrain_d2.data.build import build_sample_plan
from selftrain_d2.data.samplers import MixedPlan, PermutationPlan, plan_stream, real_per_epoch

from ..conftest import DEMO_CONFIG


def _split(plan, seed, epoch, num_real):
    p = plan.epoch(seed, epoch)
    return p.index[p.index < num_real], p.index[p.index >= num_real]


def test_half_the_real_images_plus_three_pseudo_per_real_at_ratio_3():
    num_real, num_pseudo = 20, 400
    plan = MixedPlan(num_real, num_pseudo, pseudo_ratio=3, real_fraction=0.5)
    assert (plan.num_real_samples, plan.num_pseudo_samples, plan.epoch_size) == (10, 30, 40)
    seen = []
    for epoch in range(2):
        real, pseudo = _split(plan, 5, epoch, num_real)
        assert len(real) == 10 and len(pseudo) == 30
        assert len(set(real.tolist())) == 10  # no real image twice within an epoch
        assert len(set(pseudo.tolist())) == 30 and (pseudo < num_real + num_pseudo).all()
        seen.append(set(real.tolist()))
    # Every real image once over the two epochs, then again over the next two.
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(num_real))
    next_two = np.concatenate([_split(plan, 5, e, num_real)[0] for e in (2, 3)])
    assert sorted(next_two.tolist()) == list(range(num_real))
    # Real and pseudo samples are shuffled together, and the stream resumes mid-epoch.
    first = plan.epoch(5, 0).index
    assert (first[:10] >= num_real).any() and (first[:10] < num_real).any()
    stream = plan_stream(plan, seed=5)
    full = [next(stream) for _ in range(100)]
    resumed = plan_stream(plan, seed=5, start=57)
    assert [next(resumed) for _ in range(43)] == full[57:]


@pytest.mark.parametrize("ratio", [1, 3, 5, 7])
def test_duplicate_real_baseline_has_the_students_epoch_length(ratio):
    """Table 2b: the baseline at ratio x replaces the pseudo samples by real ones, REAL_REPEAT 1 + x."""
    student = MixedPlan(20, 400, pseudo_ratio=ratio, real_fraction=0.5)
    baseline = MixedPlan(20, 0, pseudo_ratio=0, real_fraction=0.5, real_repeat=1 + ratio)
    assert baseline.epoch_size == student.epoch_size == 10 * (1 + ratio)
    counts = np.bincount(baseline.epoch(2, 0).index, minlength=20)
    # (1 + x) / 2 passes over the real images per epoch: each image that often, give or take one (odd x + 1).
    assert counts.sum() == 10 * (1 + ratio) and counts.max() - counts.min() <= 1
    two = np.bincount(np.concatenate([baseline.epoch(2, e).index for e in range(2)]), minlength=20)
    assert two.tolist() == [1 + ratio] * 20
    assert real_per_epoch(20, 0.5, 1) == 10 and real_per_epoch(3, 0.1) == 1 and real_per_epoch(0, 0.5) == 0


def test_the_default_epoch_is_unchanged():
    """REAL_FRACTION 1 keeps the epoch of every real image once (REAL_REPEAT permutations) as before."""
    plan = MixedPlan(10, 7, pseudo_ratio=1, real_fraction=1.0)
    real, _ = _split(plan, 3, 0, 10)
    assert sorted(real.tolist()) == list(range(10))
    with pytest.raises(ValueError, match=r"real_fraction must be in \(0, 1\], got 1.5"):
        MixedPlan(10, 7, real_fraction=1.5)


@pytest.fixture
def real_and_pseudo(new_name):
    names = new_name("real"), new_name("pseudo")
    for name, n in zip(names, (20, 50)):
        records = [{"file_name": f"/nonexistent/{name}_{i}.png", "sem_seg_file_name": f"/nonexistent/{i}.png",
                    "height": 8, "width": 8, "image_id": i} for i in range(n)]
        DatasetCatalog.register(name, lambda records=records: records)
        MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255)
    return names


def _plan(names, *opts):
    real, pseudo = names
    cfg = load_config(DEMO_CONFIG, ["DATASETS.TRAIN", f"('{real}',)", *opts])
    pseudo_names = list(cfg.DATASETS.TRAIN_PSEUDO)
    dicts = DatasetCatalog.get(real)
    pseudo_dicts = [d for n in pseudo_names for d in DatasetCatalog.get(n)]
    return build_sample_plan(cfg, [real], dicts, pseudo_names, pseudo_dicts)


def test_config_keys_give_the_papers_epoch_and_its_baseline(real_and_pseudo):
    real, pseudo = real_and_pseudo
    student = _plan(real_and_pseudo, "DATASETS.TRAIN_PSEUDO", f"('{pseudo}',)", "DATALOADER.REAL_FRACTION", "0.5",
                    "DATALOADER.PSEUDO_RATIO", "3.0")
    assert (student.num_real_samples, student.num_pseudo_samples) == (10, 30)
    baseline = _plan(real_and_pseudo, "DATALOADER.REAL_FRACTION", "0.5", "DATALOADER.REAL_REPEAT", "4")
    assert (baseline.num_real_samples, baseline.num_pseudo_samples) == (40, 0)
    half = _plan(real_and_pseudo, "DATALOADER.REAL_FRACTION", "0.5")  # a teacher on half the images per epoch
    assert half.epoch_size == 10
    assert isinstance(_plan(real_and_pseudo), PermutationPlan)  # the default: as before
    with pytest.raises(ValueError, match=r"DATALOADER.REAL_FRACTION must be in \(0, 1\].*got 0.0"):
        _plan(real_and_pseudo, "DATALOADER.REAL_FRACTION", "0.0")
