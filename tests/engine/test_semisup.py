"""Guided distillation trainer on a tiny Mask2Former: teacher schedule, losses, resume, eval, CPU DDP."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

from selftrain_d2.config import get_selftrain_cfg, load_config
from selftrain_d2.engine import SemiSupervisedTrainer, TRAINER_REGISTRY, default_argument_parser
from selftrain_d2.engine.train_step import check_finite_losses
from selftrain_d2.teacher import raw_predictions

from ..conftest import ROOT
from ..helpers import TINY_MASK2FORMER, Killed, KillAfter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: several times faster on one thread

CONFIG = os.path.join(ROOT, "configs", "demo", "guided-distillation-student.yaml")
SEMANTIC_CONFIG = os.path.join(ROOT, "configs", "demo", "guided-distillation-semantic.yaml")



def _cfg(out, *opts, config=CONFIG):
    cfg = load_config(config, TINY_MASK2FORMER + ["OUTPUT_DIR", str(out)] + list(opts))
    cfg.freeze()
    return cfg


def _weights(trainer):
    student = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    return student, teacher


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


def test_resume_mid_burn_in_and_mid_ema_repeats_the_uninterrupted_run(tmp_path, teacher_weights):
    opts = ["SOLVER.MAX_ITER", "6", "SEMISUP.BURN_IN_ITERS", "3", "SOLVER.CHECKPOINT_PERIOD", "2",
            "SEMISUP.TEACHER.WEIGHTS", teacher_weights]
    whole = SemiSupervisedTrainer(_cfg(tmp_path / "a", *opts))
    whole.resume_or_load(resume=False)
    guide = {k: v.clone() for k, v in whole.teacher.state_dict().items()}
    whole.train()
    reference = _weights(whole)
    # The EMA teacher moved away from the burn-in teacher and from the student.
    assert any(not torch.equal(guide[k], reference[1][k]) for k in guide)
    assert any(not torch.equal(reference[0][k], reference[1][k]) for k in guide)

    cfg = _cfg(tmp_path / "b", *opts)
    for kill_after, start in [(2, None), (4, 2), (None, 4)]:  # killed in burn-in, then in the EMA stage
        trainer = SemiSupervisedTrainer(cfg)
        if kill_after:
            trainer.register_hooks([KillAfter(kill_after)])
        trainer.resume_or_load(resume=start is not None)
        assert trainer.start_iter == (start or 0)
        if kill_after:
            with pytest.raises(Killed):
                trainer.train()
        else:
            trainer.train()
    _assert_same(_weights(trainer), reference)
    saved = torch.load(tmp_path / "b" / "model_final.pth", weights_only=False)
    assert saved["teacher"].keys() == reference[1].keys()
    torch.testing.assert_close(saved["teacher"]["sem_seg_head.predictor.class_embed.weight"],
                               reference[1]["sem_seg_head.predictor.class_embed.weight"], rtol=0, atol=0)


def test_teacher_gets_no_gradients_and_no_optimizer_state(tmp_path, teacher_weights):
    trainer = SemiSupervisedTrainer(_cfg(tmp_path, "SOLVER.MAX_ITER", "2", "SEMISUP.BURN_IN_ITERS", "1",
                                         "SEMISUP.TEACHER.WEIGHTS", teacher_weights))
    trainer.resume_or_load(resume=False)
    trainer.train()
    teacher_params = list(trainer.teacher.parameters())
    assert teacher_params and all(not p.requires_grad and p.grad is None for p in teacher_params)
    assert not trainer.teacher.model.training and trainer.model.training
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher_params}
    assert len(trainer.optimizer.state) == sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert trainer.checkpointer.checkpointables["teacher"] is trainer.teacher


class _CountPredictions:
    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def __call__(self, batch):
        self.calls.append(len(batch))
        return self.teacher.__class__.predict(self.teacher, batch)


def test_plain_mode_burns_in_on_labels_only_then_uses_the_ema_teacher(tmp_path):
    trainer = SemiSupervisedTrainer(_cfg(tmp_path, "SEMISUP.MODE", "plain", "SOLVER.MAX_ITER", "4",
                                         "SEMISUP.BURN_IN_ITERS", "2", "SEMISUP.UNLABELED_PERIOD", "1"))
    trainer.resume_or_load(resume=False)
    counter = _CountPredictions(trainer.teacher)
    trainer.teacher.predict = counter
    seen = []

    class Record(HookBase):
        def after_step(self):
            seen.append(any(k.endswith("_unsup") for k in self.trainer.storage.latest()))

    trainer.register_hooks([Record()])
    trainer.train()
    assert seen == [False, False, True, True] and counter.calls == [1, 1]
    assert trainer.schedule.teacher_at(0) is None and trainer.schedule.teacher_at(2) is trainer.teacher


def test_guided_mode_needs_the_teacher_weights(tmp_path):
    with pytest.raises(ValueError, match="SEMISUP.TEACHER.WEIGHTS"):
        SemiSupervisedTrainer(_cfg(tmp_path, "SEMISUP.BURN_IN_ITERS", "2"))
    trainer = SemiSupervisedTrainer(_cfg(tmp_path, "SEMISUP.TEACHER.WEIGHTS", str(tmp_path / "missing.pth")))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        trainer.resume_or_load(resume=False)


def test_images_without_pseudo_objects_learn_no_object(tmp_path, teacher_weights):
    # The reference's behaviour (the default): no pseudo object above the threshold 1.01, yet the queries of
    # the strong views are trained to "no object": loss_ce_unsup = lambda_u x class weight x the mean over
    # queries of -log p(no object), and a gradient step raises p(no object).
    defaults = get_selftrain_cfg().SEMISUP
    assert defaults.EMPTY_PSEUDO_LABELS == "no_object" and defaults.UNSUP_LOSS_WEIGHT == 2.0
    # (the demo student keeps the settings from before, which scored higher on the demo: set the defaults here)
    trainer = SemiSupervisedTrainer(_cfg(tmp_path, "SEMISUP.ONLINE_PSEUDO_LABELS.SCORE_THRESHOLD", "1.01",
                                         "SEMISUP.TEACHER.WEIGHTS", teacher_weights, "SEMISUP.EMPTY_PSEUDO_LABELS",
                                         "no_object", "SEMISUP.UNSUP_LOSS_WEIGHT", "2.0"))
    cfg = trainer.cfg
    trainer.resume_or_load(resume=False)
    step, student = trainer.train_step, trainer.model

    def log_no_object(batch):
        torch.manual_seed(0)  # the backbone's stochastic depth draws the same as in the training forward below
        with torch.no_grad():
            outputs, _, _ = raw_predictions(student, [{"image": r["image_strong"]} for r in batch])
        return outputs["pred_logits"].float().log_softmax(-1)[..., -1].mean()

    with EventStorage(0) as storage:
        batch = step._unlabeled_batch(0)
        before = log_no_object(batch)
        torch.manual_seed(0)
        losses = step.unsupervised_losses(trainer.teacher, batch)
        assert storage.latest()["semisup/empty_pseudo_label_share"][0] == 1.0
        expected = 2.0 * cfg.MODEL.MASK_FORMER.CLASS_WEIGHT * -before
        assert losses["loss_ce_unsup"].item() == pytest.approx(expected.item(), rel=1e-4)
        assert losses["loss_mask_unsup"].item() == 0.0 and losses["loss_dice_unsup"].item() == 0.0
        student.zero_grad()
        sum(losses.values()).backward()
        with torch.no_grad():
            for p in student.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad
        assert log_no_object(batch) > before


def test_empty_pseudo_labels_give_zero_unsupervised_loss(tmp_path, teacher_weights):
    # The behaviour before issue 24, kept as an option: a batch without any pseudo object adds nothing.
    trainer = SemiSupervisedTrainer(_cfg(tmp_path, "SEMISUP.ONLINE_PSEUDO_LABELS.SCORE_THRESHOLD", "1.01",
                                         "SEMISUP.TEACHER.WEIGHTS", teacher_weights, "SEMISUP.UNSUP_LOSS_WEIGHT", "2.0",
                                         "SEMISUP.EMPTY_PSEUDO_LABELS", "zero_if_all_empty"))
    trainer.resume_or_load(resume=False)
    step = trainer.train_step
    with EventStorage(0):
        batch = step._unlabeled_batch(0)
        losses = step.unsupervised_losses(trainer.teacher, batch)
        assert losses and all(k.endswith("_unsup") for k in losses)
        assert all(float(v.detach()) == 0.0 for v in losses.values())  # exactly zero, not NaN
        sum(losses.values()).backward()  # still a valid graph
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainer.model.parameters())

        step.labeler.steps[1] = (step.labeler.steps[1][0], {"threshold": 0.0, "class_thresholds": ()})
        kept = step.unsupervised_losses(trainer.teacher, batch)
        assert sum(float(v.detach()) for v in kept.values()) > 0


def test_non_finite_loss_names_the_term_and_the_iteration():
    ok = {"loss_ce": torch.tensor(1.0), "loss_dice_unsup": torch.tensor(0.5)}
    check_finite_losses(ok, 3)
    bad = dict(ok, loss_mask_unsup=torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match=r"'loss_mask_unsup' is nan at iteration 17"):
        check_finite_losses(bad, 17)


def test_non_finite_loss_stops_training(tmp_path, teacher_weights):
    trainer = SemiSupervisedTrainer(_cfg(tmp_path, "SOLVER.MAX_ITER", "3", "SEMISUP.BURN_IN_ITERS", "1",
                                         "SEMISUP.TEACHER.WEIGHTS", teacher_weights))
    trainer.resume_or_load(resume=False)

    class Poison(HookBase):  # the unsupervised weight turns infinite at iteration 1
        def before_step(self):
            if self.trainer.iter == 1:
                self.trainer.train_step.unsup_weight = float("inf")

    trainer.register_hooks([Poison()])
    with pytest.raises(FloatingPointError, match=r"_unsup' is (inf|nan) at iteration 1"):
        trainer.train()


def test_semantic_variant_trains(tmp_path):
    cfg = _cfg(tmp_path, "SEMISUP.MODE", "plain", "SEMISUP.BURN_IN_ITERS", "0", "SOLVER.MAX_ITER", "1",
               "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "12", config=SEMANTIC_CONFIG)
    trainer = SemiSupervisedTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.train_step.labeler.targets == "semantic"
    assert "loss_ce_unsup" in trainer.storage.latest()


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "selftrain_d2", "cli", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_val(new_name):
    """The first 3 images of the demo validation split, with its metadata (COCO json)."""
    name = new_name("val")
    dicts = DatasetCatalog.get("demo_city_val_instance")[:3]
    DatasetCatalog.register(name, lambda: dicts)
    meta = MetadataCatalog.get("demo_city_val_instance").as_dict()
    meta.pop("name")
    MetadataCatalog.get(name).set(**meta)
    return name


def test_train_net_picks_the_trainer_and_evaluates_both_models_from_a_checkpoint(tmp_path, teacher_weights, tiny_val):
    assert TRAINER_REGISTRY.get("SemiSupervisedTrainer") is SemiSupervisedTrainer
    train_net = _train_net()
    out = str(tmp_path / "run")
    args = ["--config-file", CONFIG] + TINY_MASK2FORMER + [
        "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2", "SEMISUP.BURN_IN_ITERS", "1", "SEMISUP.TEACHER.WEIGHTS",
        teacher_weights, "DATASETS.TEST", f"('{tiny_val}',)", "SEMISUP.EVAL_MODEL", "BOTH"]
    trained = train_net.run(default_argument_parser().parse_args(args))
    assert "segm" in trained and "teacher/segm" in trained
    assert json.load(open(os.path.join(out, "final_metrics.json")))["teacher/segm"] == pytest.approx(trained["teacher/segm"], nan_ok=True)

    final = os.path.join(out, "model_final.pth")
    for which, keys in [("BOTH", {"segm", "teacher/segm"}), ("TEACHER", {"segm"})]:
        evaluated = train_net.run(default_argument_parser().parse_args(
            ["--eval-only"] + args + ["MODEL.WEIGHTS", final, "SEMISUP.EVAL_MODEL", which]))
        assert keys <= set(evaluated)
        expected = trained["teacher/segm"] if which == "TEACHER" else trained["segm"]
        assert evaluated["segm"] == pytest.approx(expected, abs=1e-9, nan_ok=True)
    with pytest.raises(KeyError, match="holds no 'teacher'"):
        train_net.run(default_argument_parser().parse_args(
            ["--eval-only"] + args + ["MODEL.WEIGHTS", teacher_weights, "SEMISUP.EVAL_MODEL", "TEACHER"]))


@pytest.mark.slow
def test_two_process_cpu_ddp_trains(tmp_path, teacher_weights):
    out = tmp_path / "ddp"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG, "--num-gpus", "2",
           *TINY_MASK2FORMER, "SOLVER.IMS_PER_BATCH", "2", "SEMISUP.UNLABELED_IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
           "SEMISUP.BURN_IN_ITERS", "1", "SEMISUP.TEACHER.WEIGHTS", teacher_weights, "MODEL.DEVICE", "cpu",
           "OUTPUT_DIR", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in proc.stdout + proc.stderr
    saved = torch.load(out / "model_final.pth", weights_only=False)
    assert "teacher" in saved and saved["iteration"] == 2
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert metrics[-1]["iteration"] == 2 and "loss_ce_unsup" in metrics[-1]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m)


SEMISUP_CONFIGS = sorted(
    os.path.join(d, f) for d in (os.path.join(ROOT, "configs", "coco", "semi-supervised"),
                                 os.path.join(ROOT, "configs", "cityscapes", "semi-supervised"))
    for f in os.listdir(d) if f.startswith("guided-distillation-")
)


def test_semi_supervised_configs_cover_the_paper_settings_and_merge():
    names = {os.path.basename(p) for p in SEMISUP_CONFIGS}
    for pcts, count in [(("0.4", "1", "2", "5", "10"), "coco"), (("5", "10", "20", "30"), "cityscapes")]:
        for bb in ("R50", "swin-tiny", "dinov2-vitb14"):
            for pct in pcts:
                assert f"guided-distillation-{bb}-{pct}pct.yaml" in names, (count, bb, pct)
    from selftrain_d2.data import MAPPER_REGISTRY

    for path in SEMISUP_CONFIGS:
        cfg = load_config(path)
        assert cfg.SELFTRAIN.TRAINER == "SemiSupervisedTrainer" and cfg.SEMISUP.EMA_DECAY == 0.9996, path
        assert cfg.SEMISUP.UNLABELED_MAPPER_NAME in MAPPER_REGISTRY
        (name, base, split_file), = cfg.DATASETS.SPLITS
        assert cfg.DATASETS.TRAIN == (name,) and cfg.DATASETS.TRAIN_UNLABELED == (name + "_unlabeled",)
        pct = os.path.basename(path).rsplit("-", 1)[1].replace(".yaml", "")
        assert split_file.endswith(f"/{base}/{pct}_seed1.txt"), path


def test_recipe_train_stage_passes_the_teacher_weights(tmp_path):
    from selftrain_d2.orchestration.recipe import load_recipe
    from selftrain_d2.orchestration.recipe.stages import STAGE_REGISTRY, RecipeContext

    recipe = load_recipe(os.path.join(ROOT, "configs", "demo", "guided-distillation.yaml"))
    assert [s.name for s in recipe.stages] == ["teacher", "student", "ema_teacher"]
    ctx = RecipeContext(recipe, tmp_path)
    ctx.results["teacher"] = {"weights": "/runs/teacher/model_final.pth"}
    stage = STAGE_REGISTRY.get("train")(recipe.stage("student"), ctx)
    assert stage._derived_opts() == ["SEMISUP.TEACHER.WEIGHTS", "/runs/teacher/model_final.pth"]
    assert stage.dependencies() == ["teacher"]
