"""End-to-end training behaviour on the demo data: resume, eval-only, CPU DDP."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from selftrain_d2.engine import Trainer, default_argument_parser

from ..conftest import DEMO_CONFIG, FAST_TRAIN_OPTS, ROOT
from ..helpers import Killed, KillAfter, assert_same_state, trainer_state


def test_resume_after_kill_repeats_the_uninterrupted_run(fast_cfg, tmp_path):
    opts = ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    uninterrupted = Trainer(fast_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "a")))
    uninterrupted.resume_or_load(resume=False)
    uninterrupted.train()
    reference = trainer_state(uninterrupted)
    assert reference["iter"] == 6  # Detectron2 leaves iter at max_iter after training

    cfg = fast_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "b"))
    killed = Trainer(cfg)
    killed.register_hooks([KillAfter(3)])
    killed.resume_or_load(resume=False)
    with pytest.raises(Killed):
        killed.train()
    assert (tmp_path / "b" / "model_0000002.pth").exists()
    assert not (tmp_path / "b" / "model_final.pth").exists()

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    assert_same_state(trainer_state(resumed), reference)


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "selftrain_d2", "cli", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_only_reproduces_the_final_metrics_without_a_train_loader(tmp_path, monkeypatch):
    train_net = _train_net()
    out = str(tmp_path / "out")
    common = ["--config-file", DEMO_CONFIG]
    opts = FAST_TRAIN_OPTS + ["OUTPUT_DIR", out]
    trained = train_net.run(default_argument_parser().parse_args(common + opts))
    assert "sem_seg" in trained and 0 <= trained["sem_seg"]["mIoU"] <= 100
    assert json.load(open(os.path.join(out, "final_metrics.json")))["sem_seg"]["mIoU"] == trained["sem_seg"]["mIoU"]

    def no_train_loader(*a, **k):
        raise AssertionError("--eval-only built a training data loader")

    monkeypatch.setattr(Trainer, "build_train_loader", classmethod(no_train_loader))
    evaluated = train_net.run(default_argument_parser().parse_args(
        common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]))
    assert evaluated["sem_seg"] == pytest.approx(trained["sem_seg"], abs=1e-9)


@pytest.mark.slow
def test_two_process_cpu_ddp_trains(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DEMO_CONFIG,
           "--num-gpus", "2", *FAST_TRAIN_OPTS, "SOLVER.IMS_PER_BATCH", "4", "DATASETS.TEST", "()",
           "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)]  # CPU processes need MODEL.DEVICE cpu explicitly
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in proc.stdout + proc.stderr
    assert (out / "model_final.pth").exists()
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert metrics[-1]["iteration"] == 3 and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics)
