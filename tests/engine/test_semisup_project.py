"""projects/RampedGuidedDistillation: a semi-supervised variant added purely by registration."""
import os
import sys

import pytest
import torch

from selftrain_d2.config import load_config
from selftrain_d2.engine import TRAINER_REGISTRY, build_trainer_class
from selftrain_d2.teacher import PSEUDO_FILTER_REGISTRY, build_pseudo_filters
from selftrain_d2.teacher.filters import candidates_from_queries

from ..conftest import ROOT
from ..helpers import TINY_MASK2FORMER

pytestmark = pytest.mark.usefixtures("one_thread")

PROJECT = os.path.join(ROOT, "projects", "RampedGuidedDistillation")
CONFIG = os.path.join(PROJECT, "configs", "ramped-gd-demo.yaml")


@pytest.fixture(scope="module")
def ramped_gd():
    sys.path.insert(0, PROJECT)
    try:
        import ramped_gd

        yield ramped_gd
    finally:
        sys.path.remove(PROJECT)


def test_project_registers_its_filter_and_trainer(ramped_gd):
    assert PSEUDO_FILTER_REGISTRY.get("top_k_per_image") is ramped_gd.top_k_per_image
    cfg = load_config(CONFIG)
    assert build_trainer_class(cfg) is ramped_gd.RampedGuidedDistillationTrainer
    assert TRAINER_REGISTRY.get("RampedGuidedDistillationTrainer") is ramped_gd.RampedGuidedDistillationTrainer
    names = [fn.__name__ for fn, _ in build_pseudo_filters(cfg)]
    assert names[2] == "top_k_per_image" and build_pseudo_filters(cfg)[2][1] == {"k": 10}
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02], [0.1, 0.7, 0.1, 0.1]])
    c = candidates_from_queries(probs.log(), torch.zeros(3, 4, 4), (4, 4), (4, 4))
    kept = ramped_gd.top_k_per_image(c, k=2)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7]) and kept.labels.tolist() == [0, 1]


def test_ramp_weight_by_hand(ramped_gd):
    assert [ramped_gd.ramp_weight(i, 2.0, 4) for i in (0, 1, 3, 10)] == [0.5, 1.0, 2.0, 2.0]
    assert ramped_gd.ramp_weight(0, 2.0, 0) == 2.0


def test_project_trainer_ramps_lambda_u(ramped_gd, tmp_path, teacher_weights):  # noqa: F811
    cfg = load_config(CONFIG, TINY_MASK2FORMER + ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2", "SEMISUP.BURN_IN_ITERS", "1",
                                      "SEMISUP.TEACHER.WEIGHTS", teacher_weights, "PROJECTS.RAMPED_GD.RAMP_ITERS", "4",
                                      "SEMISUP.UNSUP_LOSS_WEIGHT", "2.0"])
    cfg.freeze()
    trainer = build_trainer_class(cfg)(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.train_step.unsup_weight == pytest.approx(1.0)  # iteration 1 of a 4-iteration ramp to 2.0
