"""Crop-size schedules: crop, batch, learning-rate factor and iterations per epoch against hand tables."""
import pytest

from selftrain_d2.data.crop_schedules import CROP_SCHEDULE_REGISTRY, EpochTable, batch_for_crop, lr_factor

SCALES = [0.5, 0.75, 1.0]
FULL = (100, 200)
CROPS = {0: (50, 100), 1: (75, 150), 2: (100, 200)}
# pixels per batch 100*200*4 = 80000: 80000/5000 = 16, 80000/11250 = 7.1 -> 7, 80000/20000 = 4
BATCH = {0: 16, 1: 7, 2: 4}
ITERS = {0: 2, 1: 3, 2: 5}  # ceil(20 / batch)

# Scale index per epoch (6 epochs), hand-written from the paper's definitions.
TABLES = {
    ("constant", 0): [2, 2, 2, 2, 2, 2],
    ("coarse2fine", 0): [0, 0, 1, 1, 2, 2],  # 6 epochs / 3 crops: 2 epochs each
    ("fine2coarse", 3): [2, 2, 2, 2, 1, 0],  # period 0 spreads the 3 epochs after the warm-up over 3 crops
    ("fine2coarse", 0): [2, 2, 1, 1, 0, 0],
    ("coarse2fine+", 0): [0, 1, 2, 0, 1, 2],
    ("fine2coarse+", 0): [2, 1, 0, 2, 1, 0],
    ("coarse2fine", 2): [2, 2, 0, 0, 1, 2],  # warm-up at the largest crop, then 4 epochs over 3 crops
    ("coarse2fine+", 1): [2, 0, 1, 2, 0, 1],
    ("fine2coarse+", 1): [2, 2, 1, 0, 2, 1],
}


def _table(name, warmup, **kw):
    args = dict(schedule=name, scales=SCALES, full_crop=FULL, full_batch=4, max_batch=16, epoch_size=20,
                num_epochs=6, warmup_epochs=warmup)
    args.update(kw)
    return EpochTable(**args)


def test_every_registered_schedule_has_a_hand_table():
    assert {name for name, _ in TABLES} == {name for name, _ in CROP_SCHEDULE_REGISTRY}


@pytest.mark.parametrize("name,warmup", sorted(TABLES))
def test_schedule_crop_batch_lr_per_epoch(name, warmup):
    table = _table(name, warmup)
    expected = TABLES[(name, warmup)]
    assert [e.crop for e in table.entries] == [CROPS[i] for i in expected]
    assert [e.batch for e in table.entries] == [BATCH[i] for i in expected]
    assert [e.iterations for e in table.entries] == [ITERS[i] for i in expected]
    assert [e.lr_factor for e in table.entries] == pytest.approx([BATCH[i] / 4 for i in expected])
    # Every schedule processes the same images: 6 epochs x 20.
    assert table.total_images() == 120
    assert table.max_iter == sum(ITERS[i] for i in expected)


def test_batch_spans_cover_each_epoch_exactly_once():
    table = _table("coarse2fine+", 1)
    spans = [table.batch_span(i) for i in range(table.max_iter)]
    assert spans[0] == (0, 4)
    covered = [p for start, stop in spans for p in range(start, stop)]
    assert covered == list(range(120))
    # The epoch at crop 0.5 (batch 16) ends with a short batch of 4.
    first = table.entries[1]
    assert [table.batch_span(first.first_iter + k) for k in range(2)] == [(20, 36), (36, 40)]


def test_ddp_rounds_batch_and_epoch_to_the_process_count():
    assert batch_for_crop((75, 150), FULL, 4, 16, multiple=2) == 6
    table = _table("constant", 0, epoch_size=21, multiple=2)
    assert table.epoch_size == 22


def test_lr_rules():
    assert lr_factor(16, 4) == 4
    assert lr_factor(16, 4, "sqrt") == 2
    assert lr_factor(16, 4, "none") == 1
    with pytest.raises(ValueError, match="cubic"):
        lr_factor(16, 4, "cubic")


def test_past_the_table_the_last_epoch_repeats():
    table = _table("constant", 0)
    assert table.batch_span(table.max_iter) == (120, 124)
    assert table.batch_span(table.max_iter + 5) == (140, 144)
