"""Crop-size schedules: crop, batch, learning-rate factor and iterations per epoch against hand tables."""
import pytest

from selftrain_d2.data.crop_schedules import CROP_SCHEDULE_REGISTRY, EpochTable, batch_for_crop, lr_factor, scaled_crop

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


def test_scaled_crops_round_to_the_padding_multiple():
    # 128x256 at 0.5 ... 1.0, sides to the nearest multiple of 32 (77 -> 64, 154 -> 160, 90 -> 96, ...).
    crops = [scaled_crop((128, 256), s, 32) for s in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert crops == [(64, 128), (64, 160), (96, 192), (96, 192), (128, 224), (128, 256)]
    assert scaled_crop((128, 256), 0.6) == (77, 154)  # divisibility 1: exact scales
    assert scaled_crop((100, 200), 0.1, 32) == (32, 32)  # at least one multiple
    assert scaled_crop((90, 769), 0.95, 32) == (90, 736)  # never above the full crop (85.5 -> 96 -> 90)
    assert scaled_crop((100, 769), 1.0, 32) == (100, 769)  # the full crop as configured
    table = _table("coarse2fine+", 0, full_crop=(128, 256), scales=[0.6, 1.0], size_divisibility=32)
    # 128*256*4 pixels / (64*160) = 12.8 -> batch 12, the learning rate x3.
    assert [(e.crop, e.batch, e.lr_factor) for e in table.entries[:2]] == [((64, 160), 12, 3.0), ((128, 256), 4, 1.0)]


def test_the_papers_crop_set_at_800_by_default():
    """Section 3.3: 400, 480, 560, 640, 720, 800 at scales 0.5 ... 1.0 of an 800 crop, each batch at the base
    learning rate (the paper names no scaling rule)."""
    from selftrain_d2.config import load_config
    from selftrain_d2.data.build import build_epoch_table

    from ..conftest import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, ["INPUT.CROP.SIZE", "(800, 800)", "SOLVER.IMS_PER_BATCH", "16",
                                    "INPUT.CROP_SCHEDULE.ENABLED", "True", "INPUT.CROP_SCHEDULE.NAME", "coarse2fine+",
                                    "INPUT.CROP_SCHEDULE.EPOCHS", "6"])
    table = build_epoch_table(cfg, epoch_size=2975)
    assert [e.crop for e in table.entries] == [(s, s) for s in (400, 480, 560, 640, 720, 800)]
    assert [e.batch for e in table.entries] == [64, 44, 32, 25, 19, 16]  # 16 x 800^2 pixels, at most 64 images
    assert {e.lr_factor for e in table.entries} == {1.0}
    cfg.merge_from_list(["INPUT.CROP_SCHEDULE.LR_SCALING", "linear"])
    assert build_epoch_table(cfg, epoch_size=2975).entries[0].lr_factor == 4.0


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


def test_period_sets_epochs_per_crop():
    table = _table("coarse2fine", 0, period=1)
    assert [e.crop for e in table.entries] == [CROPS[i] for i in [0, 1, 2, 2, 2, 2]]


class _RecordingMapper:
    supports_crop_size = True

    def __call__(self, record):
        return {"index": record["index"], "crop_size": record["crop_size"]}


def _stream(table, world_size=1, rank=0, seed=3):
    from selftrain_d2.data.build import SeededTrainStream

    dataset = [{"index": i} for i in range(20)]
    return SeededTrainStream(dataset, _RecordingMapper(), 4, seed=seed, rank=rank, world_size=world_size,
                             table=table)


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_scheduled_stream_batches_follow_the_table_and_resume():
    table = _table("coarse2fine+", 1)
    batches = _take(_stream(table), table.max_iter)
    for i, batch in enumerate(batches):
        entry = table.at_iter(i)
        start, stop = table.batch_span(i)
        assert len(batch) == stop - start
        assert all(s["crop_size"] == entry.crop for s in batch)
    # Each epoch is a permutation of the 20 images, whatever the batch size.
    for e in table.entries:
        seen = [s["index"] for b in batches[e.first_iter:e.first_iter + e.iterations] for s in b]
        assert sorted(seen) == list(range(20))
    # Resume at iteration 7 (mid-epoch): the same batches as the uninterrupted stream.
    resumed = _stream(table)
    resumed.set_start_iter(7)
    assert _take(resumed, 5) == batches[7:12]


def test_scheduled_stream_splits_each_batch_across_processes():
    table = _table("coarse2fine+", 0, multiple=2)
    full = _take(_stream(table), 6)
    parts = [_take(_stream(table, world_size=2, rank=r), 6) for r in range(2)]
    for i in range(6):
        start, stop = table.batch_span(i)
        assert len(parts[0][i]) == len(parts[1][i]) == (stop - start) // 2
        assert sorted(s["index"] for s in parts[0][i] + parts[1][i]) == sorted(s["index"] for s in full[i])


def test_crop_schedule_lr_follows_images_and_batch():
    import torch

    from selftrain_d2.solver import CropScheduleLR

    table = _table("coarse2fine+", 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = CropScheduleLR(opt, table, warmup_iters=0, power=0.9)
    lrs = []
    for i in range(table.max_iter):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for i in (0, 5, 6, 9, table.max_iter - 1):
        progress = table.batch_span(i)[0] / 120
        expected = 0.1 * (1 - progress) ** 0.9 * table.at_iter(i).lr_factor
        assert lrs[i] == pytest.approx(expected)
    # A scheduler restored from its state continues with the same rates.
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    restored = CropScheduleLR(opt2, table, warmup_iters=0, power=0.9)
    state = {"last_epoch": 9, "base_lrs": [0.1], "_step_count": 10}
    restored.load_state_dict(state)
    restored.step()  # -> iteration 10
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[10])


def test_trainer_takes_iterations_lr_and_checkpoint_position_from_the_schedule(fast_cfg):
    from selftrain_d2.engine import Trainer
    from selftrain_d2.engine.hooks import CropScheduleHook

    cfg = fast_cfg("DATASETS.TEST", "()", "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusGlobalPoolHead",
                   "INPUT.CROP_SCHEDULE.ENABLED", "True", "INPUT.CROP_SCHEDULE.NAME", "coarse2fine+",
                   "INPUT.CROP_SCHEDULE.SCALES", "[0.5, 1.0]", "INPUT.CROP_SCHEDULE.EPOCHS", "2",
                   "INPUT.CROP_SCHEDULE.WARMUP_EPOCHS", "1", "INPUT.CROP_SCHEDULE.MAX_BATCH", "8",
                   "INPUT.CROP_SCHEDULE.LR_SCALING", "linear")
    trainer = Trainer(cfg)
    table = trainer.crop_table
    # demo_city_labeled: 20 images; epoch 0 at 128x256 (batch 2, 10 iterations), epoch 1 at 64x128 (batch 8, 3).
    assert [(e.crop, e.batch, e.iterations) for e in table.entries] == [((128, 256), 2, 10), ((64, 128), 8, 3)]
    assert trainer.max_iter == trainer.cfg.SOLVER.MAX_ITER == 13
    batch = next(iter(trainer.data_loader))
    assert len(batch) == 2 and tuple(batch[0]["image"].shape[-2:]) == (128, 256)
    hook = next(h for h in trainer._hooks if isinstance(h, CropScheduleHook))
    trainer.iter = 10
    assert hook.state_dict() == {"iteration": 11, "epoch": 1, "crop": [64, 128], "batch": 8, "lr_factor": 4.0}


def test_resume_mid_schedule_repeats_the_uninterrupted_run(fast_cfg, tmp_path):
    import pytest as _pytest

    from selftrain_d2.engine import Trainer

    from ..helpers import Killed, KillAfter, assert_same_state, trainer_state

    opts = ["DATASETS.TEST", "()", "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusGlobalPoolHead",
            "INPUT.CROP_SCHEDULE.ENABLED", "True", "INPUT.CROP_SCHEDULE.SCALES", "[0.5, 1.0]",
            "INPUT.CROP_SCHEDULE.EPOCHS", "2", "INPUT.CROP_SCHEDULE.WARMUP_EPOCHS", "1",
            "INPUT.CROP_SCHEDULE.MAX_BATCH", "8", "SOLVER.CHECKPOINT_PERIOD", "5"]
    uninterrupted = Trainer(fast_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "a")))
    uninterrupted.resume_or_load(resume=False)
    uninterrupted.train()
    reference = trainer_state(uninterrupted)
    assert reference["iter"] == 13

    cfg = fast_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "b"))
    killed = Trainer(cfg)
    killed.register_hooks([KillAfter(12)])  # dies in the second epoch (crop 64x128, batch 8)
    killed.resume_or_load(resume=False)
    with _pytest.raises(Killed):
        killed.train()
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 10  # from model_0000009.pth: the first iteration of the small-crop epoch
    assert resumed.optimizer.param_groups[0]["lr"] == _pytest.approx(
        resumed.scheduler.factor(10) * cfg.SOLVER.BASE_LR)
    batch = next(iter(resumed.data_loader))
    assert len(batch) == 8 and tuple(batch[0]["image"].shape[-2:]) == (64, 128)
    resumed.train()
    assert_same_state(trainer_state(resumed), reference)
