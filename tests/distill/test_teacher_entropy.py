"""Teacher entropy at each KD temperature: the per-pixel maths by hand, the accumulated statistics, the tool."""
import importlib.util
import json
import math
import os

import pytest
import torch

from selftrain_d2.config import load_config
from selftrain_d2.distill.entropy import TeacherEntropy, entropy_table, softmax_entropy
from selftrain_d2.modeling import build_model

from ..conftest import ROOT


def _h(ps):
    return -sum(p * math.log(p) for p in ps if p > 0)


def test_softmax_entropy_by_hand():
    # Two classes with logits (0, ln 3): p = (1/4, 3/4); at tau 2 the logits halve: p1 = sqrt(3) / (1 + sqrt(3)).
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    entropy, top = softmax_entropy(logits, 1.0)
    assert entropy.shape == (1, 1, 1) and entropy.item() == pytest.approx(_h([0.25, 0.75]), rel=1e-6)
    assert top.item() == pytest.approx(0.75)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    assert softmax_entropy(logits, 2.0)[0].item() == pytest.approx(_h([1 - p1, p1]), rel=1e-6)
    uniform = torch.zeros(2, 5, 3, 4)
    assert torch.allclose(softmax_entropy(uniform)[0], torch.full((2, 3, 4), math.log(5)))
    with pytest.raises(ValueError, match="tau must be > 0"):
        softmax_entropy(logits, 0.0)


def test_teacher_entropy_statistics_and_table():
    # Four pixels of 4 classes: three near-certain (logit gap 10), one uniform.
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[0, 2, 1, 0] = 10.0
    stats = TeacherEntropy([1.0, 4.0], bins=4, confident=0.99)
    stats.update(logits[:, :, :1])  # two batches: the first row, then the second
    stats.update(logits[:, :, 1:])
    assert stats.pixels == 4 and stats.num_classes == 4
    by_tau = {row["tau"]: row for row in stats.summary()}
    p = math.exp(10) / (math.exp(10) + 3)
    certain = _h([p] + [(1 - p) / 3] * 3)
    assert by_tau[1.0]["mean_entropy"] == pytest.approx((3 * certain + math.log(4)) / 4, rel=1e-5)
    assert by_tau[1.0]["mean_normalised"] == pytest.approx((3 * certain + math.log(4)) / 4 / math.log(4), rel=1e-5)
    assert by_tau[1.0]["share_confident"] == 0.75
    assert by_tau[1.0]["histogram"] == pytest.approx([0.75, 0.0, 0.0, 0.25])
    # At tau 4 the gap is 2.5: p = e^2.5 / (e^2.5 + 3) = 0.80, entropy 0.73 nats = 0.53 log 4, not confident.
    q = math.exp(2.5) / (math.exp(2.5) + 3)
    assert by_tau[4.0]["share_confident"] == 0.0
    assert by_tau[4.0]["histogram"] == pytest.approx([0.0, 0.0, 0.75, 0.25])
    assert by_tau[4.0]["mean_entropy"] == pytest.approx((3 * _h([q] + [(1 - q) / 3] * 3) + math.log(4)) / 4)
    table = entropy_table(stats.summary(), 0.99, 4)
    assert "| 1 | " in table and "| 4 | " in table and "75.0%" in table and "log C = 1.386" in table
    with pytest.raises(ValueError, match="changed from 4 to 3 classes"):
        stats.update(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="saw no pixels"):
        TeacherEntropy([1.0]).summary()


def test_tool_scores_a_kd_configs_teacher(tmp_path, capsys):
    path = os.path.join(ROOT, "selftrain_d2", "cli", "teacher_entropy.py")
    spec = importlib.util.spec_from_file_location("teacher_entropy", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    teacher_cfg = os.path.join(ROOT, "configs", "demo", "pspnet-effnetlite0.yaml")
    opts = ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]
    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.pth")
    torch.save({"model": build_model(load_config(teacher_cfg, opts)).state_dict()}, weights)
    out = tmp_path / "entropy.json"
    kd_config = os.path.join(ROOT, "configs", "demo", "kd-pspnet-student.yaml")
    code = tool.main(["--config-file", kd_config, "--taus", "1", "4", "--max-images", "2", "--output", str(out),
                      "DISTILL.TEACHER.CONFIG", teacher_cfg, "DISTILL.TEACHER.WEIGHTS", weights,
                      "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["num_classes"] == 10 and result["tap"] == "logits"
    assert [row["tau"] for row in result["per_tau"]] == [1.0, 4.0]
    # A higher temperature never lowers the entropy of a softmax.
    assert result["per_tau"][1]["mean_entropy"] >= result["per_tau"][0]["mean_entropy"]
    assert sum(result["per_tau"][0]["histogram"]) == pytest.approx(1.0)
    assert "| tau |" in capsys.readouterr().out
