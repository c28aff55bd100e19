"""Every model family of the demo configs trains under mixed precision through the project's trainer.

CPU stand-in for CUDA AMP: ``SOLVER.AMP.ENABLED`` with float16 (autocast on the CPU + GradScaler("cpu"))
and bfloat16. 20 steps at a small crop: every loss term finite, no matcher error, and the loss falls.
Float16 convolutions have no fast CPU kernel, so the crops are small (64x128) and the batches 2; much smaller
crops leave 1x2-pixel maps at stride 32, where batch norm over 4 values overflows float16 in backward on every
step (a property of the toy size, not of the models).
"""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from selftrain_d2.config import load_config
from selftrain_d2.distill.losses import KD_LOSS_REGISTRY
from selftrain_d2.engine import build_trainer_class
from selftrain_d2.modeling import build_model

from ..conftest import ROOT

STEPS = 20
DTYPES = ["float16", "bfloat16"]
SMALL = [
    "SOLVER.MAX_ITER", str(STEPS),
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.CROP.SIZE", "(64, 128)",
    "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.DEVICE", "cpu",
    "SEED", "3",
]


def _config(name):
    return os.path.join(ROOT, "configs", "demo", name)


def _train(tmp_path, config, dtype, *opts):
    cfg = load_config(_config(config), SMALL + ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", dtype,
                                                "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    cfg.freeze()
    trainer = build_trainer_class(cfg)(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _loss_curve(trainer, supervised_only=False):
    """Per-iteration sum of the logged loss terms (the supervised ones only, if asked)."""
    histories = trainer.storage.histories()
    # Detectron2 logs the terms only when there are several; total_loss always.
    names = [k for k in histories if k.startswith("loss") and not (supervised_only and k.endswith("_unsup"))]
    names = names or ["total_loss"]
    curve = {}
    for name in names:
        values = histories[name].values()
        assert all(torch.isfinite(torch.tensor(v)) for v, _ in values), name
        for value, it in values:
            curve[it] = curve.get(it, 0.0) + value
    return [curve[i] for i in sorted(curve)]


def _assert_trains(trainer, dtype, supervised_only=False):
    curve = _loss_curve(trainer, supervised_only)
    assert len(curve) == STEPS
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first, f"the loss did not fall in {STEPS} steps: {curve}"
    step = trainer.train_step
    if dtype == "float16":
        # Only the first steps may overflow, while the loss scale backs off from 2**16.
        assert step.grad_scaler is not None and step.skipped_steps <= 5
    else:
        assert step.grad_scaler is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["deeplabv3plus-effnetlite0.yaml", "fast-scnn.yaml", "mask2former-semantic.yaml",
                                    "mask2former-instance.yaml"])
def test_model_family_trains_under_amp(tmp_path, config, dtype):
    _assert_trains(_train(tmp_path, config, dtype), dtype)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A checkpoint of a demo config's model (fresh weights): a KD or burn-in teacher."""
    folder = tmp_path_factory.mktemp("teachers")

    def save(config, *opts):
        cfg = load_config(_config(config), ["MODEL.DEVICE", "cpu", *opts])
        path = folder / (os.path.splitext(config)[0] + ".pth")
        if not path.exists():
            torch.manual_seed(0)
            DetectionCheckpointer(build_model(cfg), str(folder)).save(path.stem)
        return str(path)

    return save


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", sorted(name for name, _ in KD_LOSS_REGISTRY))
def test_kd_distiller_trains_under_amp_with_each_kd_loss(tmp_path, saved_model, loss, dtype):
    teacher = saved_model("pspnet-effnetlite0.yaml")
    trainer = _train(tmp_path, "kd-pspnet-student.yaml", dtype, "DISTILL.TEACHER.WEIGHTS", teacher,
                     "DISTILL.LOSSES", f"['{loss}']", "DISTILL.PROBE_SIZE", "[64, 128]")
    assert f"loss_kd_{loss}" in trainer.storage.histories()
    _assert_trains(trainer, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
def test_guided_distillation_trains_under_amp_with_burn_in_then_ema_teacher(tmp_path, saved_model, dtype):
    teacher = saved_model("mask2former-instance.yaml")
    # The untrained teacher's pseudo labels (every query kept) are noise: at lambda_u 2.0 they outweigh the
    # labelled loss, which then rises over the 20 steps, so the check of the labelled loss runs at 1.0.
    trainer = _train(tmp_path, "guided-distillation-student.yaml", dtype, "SEMISUP.TEACHER.WEIGHTS", teacher,
                     "SEMISUP.BURN_IN_ITERS", "10", "SEMISUP.UNLABELED_IMS_PER_BATCH", "2",
                     "SEMISUP.ONLINE_PSEUDO_LABELS.SCORE_THRESHOLD", "0.0", "SEMISUP.UNSUP_LOSS_WEIGHT", "1.0")
    # Both phases ran and the student learnt from pseudo labels (weight > 0) in both.
    unsup = trainer.storage.histories()["loss_ce_unsup"].values()
    assert {it for _, it in unsup} == set(range(STEPS))
    assert any(v > 0 for v, it in unsup if it < 10) and any(v > 0 for v, it in unsup if it >= 10)
    _assert_trains(trainer, dtype, supervised_only=True)
