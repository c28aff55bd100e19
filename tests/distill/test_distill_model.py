"""The Distiller: frozen teacher kept out of gradients, optimizer and checkpoints; adapters and the critic
saved and restored; inference is the student's."""
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.solver import build_optimizer

from ..conftest import ROOT


def _pspnet_cfg(head):
    cfg = get_selftrain_cfg()
    cfg.MODEL.META_ARCHITECTURE = "PSPNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.PSPNET.OUTPUT_STRIDE = 32
    cfg.MODEL.PSPNET.HEAD_CHANNELS = head
    cfg.MODEL.PSPNET.AUX_FEATURE = ""
    cfg.MODEL.PSPNET.SIZE_DIVISIBILITY = 32
    cfg.INPUT.CROP.ENABLED = False
    cfg.DISTILL.PROBE_SIZE = [32, 32]
    return cfg


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    teacher_cfg = _pspnet_cfg(head=16)
    torch.manual_seed(1)
    teacher = build_model(teacher_cfg)
    DetectionCheckpointer(teacher, str(folder)).save("teacher")
    (folder / "teacher.yaml").write_text(teacher_cfg.dump())
    return folder, teacher


@pytest.fixture
def kd_cfg(teacher_files):
    folder, teacher = teacher_files
    cfg = _pspnet_cfg(head=8)
    cfg.MODEL.META_ARCHITECTURE = "Distiller"
    cfg.DISTILL.TEACHER.CONFIG = str(folder / "teacher.yaml")
    cfg.DISTILL.TEACHER.WEIGHTS = str(folder / "teacher.pth")
    cfg.DISTILL.LOSSES = ["pixel_kd", "cwd", "skd", "ifvd", "holistic"]
    cfg.DISTILL.CWD.TAP = "features"  # 8 student channels against 16: needs an adapter
    cfg.DISTILL.SKD.PATCH = 1
    cfg.DISTILL.HOLISTIC.CHANNELS = [4]
    return cfg, teacher


def _batch(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, 32, 64, generator=g) * 255, "sem_seg": torch.randint(0, 3, (32, 64), generator=g)}
            for _ in range(n)]


def test_teacher_frozen_out_of_optimizer_and_checkpoint(kd_cfg):
    cfg, saved_teacher = kd_cfg
    model = build_model(cfg)
    teacher = model.teacher
    for a, b in zip(teacher.state_dict().values(), saved_teacher.state_dict().values()):
        assert torch.equal(a, b)  # DISTILL.TEACHER.WEIGHTS loaded
    assert set(model.adapters.keys()) == {"features"}
    model.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    optimizer = build_optimizer(cfg, model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert not in_optimizer & {id(p) for p in model.kd_losses["holistic"].discriminator.parameters()}
    assert {id(p) for p in model.adapters.parameters()} <= in_optimizer
    assert all(k.startswith(("student.", "adapters.", "kd_losses.")) for k in model.state_dict())

    losses = model(_batch())
    assert {"loss_sem_seg", "loss_kd_pixel_kd", "loss_kd_cwd", "loss_kd_skd", "loss_kd_ifvd",
            "loss_kd_holistic"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in model.adapters.parameters())
    assert model.student.classifier.weight.grad is not None


def test_adapters_and_critic_saved_and_restored(kd_cfg, tmp_path):
    cfg, _ = kd_cfg
    torch.manual_seed(2)
    model = build_model(cfg)
    model.train()
    sum(model(_batch()).values()).backward()  # one critic step: Adam state and weights change
    assert model.kd_losses["holistic"].adam_step.item() == 1
    out = tmp_path / "run"
    out.mkdir()
    DetectionCheckpointer(model, str(out)).save("model_0000000")
    saved = torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=False)["model"]
    assert not any(k.startswith("teacher") for k in saved)
    assert any(k.startswith("adapters.features") for k in saved)
    assert "kd_losses.holistic.adam_step" in saved and "kd_losses.holistic.adam_exp_avg_0" in saved

    torch.manual_seed(3)
    other = build_model(cfg)
    assert not torch.equal(other.adapters["features"].weight, model.adapters["features"].weight)
    DetectionCheckpointer(other, str(out)).resume_or_load(str(out / "model_0000000.pth"), resume=False)
    for name in ("adapters", "kd_losses", "student"):
        a, b = getattr(model, name).state_dict(), getattr(other, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert other.kd_losses["holistic"].adam_step.item() == 1


def test_plain_student_checkpoint_loads_into_the_student(kd_cfg, tmp_path):
    cfg, _ = kd_cfg
    student_cfg = _pspnet_cfg(head=8)
    torch.manual_seed(4)
    student = build_model(student_cfg)
    DetectionCheckpointer(student, str(tmp_path)).save("student")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "student.pth"))
    for k, v in student.state_dict().items():
        assert torch.equal(model.student.state_dict()[k], v), k


def test_inference_is_the_students(kd_cfg):
    cfg, _ = kd_cfg
    model = build_model(cfg)
    model.eval()
    batch = [{"image": x["image"]} for x in _batch(1)]
    with torch.no_grad():
        ours, students = model(batch)[0]["sem_seg"], model.student(batch)[0]["sem_seg"]
    assert ours.shape == (3, 32, 64) and torch.equal(ours, students)


def test_missing_teacher_weights_and_unknown_tap_fail_clearly(kd_cfg):
    cfg, _ = kd_cfg
    cfg.DISTILL.TEACHER.WEIGHTS = "/nonexistent/teacher.pth"
    with pytest.raises(FileNotFoundError, match="DISTILL.TEACHER.WEIGHTS"):
        build_model(cfg)
    cfg.DISTILL.TEACHER.WEIGHTS = ""
    cfg.DISTILL.TAPS = [["logits", "classifer", "classifier"], ["features", "psp", "psp"]]
    with pytest.raises(KeyError, match="did you mean classifier"):
        build_model(cfg)


def test_shipped_kd_configs_merge():
    import glob
    import importlib.util
    import os

    from selftrain_d2.config import load_config

    root = ROOT
    files = glob.glob(os.path.join(root, "configs", "*", "knowledge-distillation", "*.yaml"))
    files += [f for f in glob.glob(os.path.join(root, "configs", "demo", "*.yaml"))
              if os.path.basename(f).startswith(("pspnet", "kd-")) and not f.endswith("kd-sweep.yaml")]
    assert len(files) >= 27
    for f in files:
        cfg = load_config(f)
        if cfg.MODEL.META_ARCHITECTURE == "Distiller":
            assert os.path.isfile(os.path.join(root, cfg.DISTILL.TEACHER.CONFIG)), f
            assert load_config(os.path.join(root, cfg.DISTILL.TEACHER.CONFIG)).MODEL.META_ARCHITECTURE == "PSPNet"
    spec = importlib.util.spec_from_file_location("sweep_cfg", os.path.join(root, "selftrain_d2", "orchestration", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    spec = sweep.load_sweep(os.path.join(root, "configs", "demo", "kd-sweep.yaml"))
    assert all(os.path.isfile(os.path.join(root, c)) for c in spec["configs"].values())
