"""tools/sweep.py: the staged protocol, resume after a kill without redoing finished trials, reports."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(ROOT, "tools", "sweep.py")

SWEEP_YAML = """
name: t
configs: {student: student.yaml, kd: kd.yaml}
metric: sem_seg/mIoU
overrides: [SOLVER.MAX_ITER, 5]
stages:
  - name: student-lr
    config: student
    grid: {SOLVER.BASE_LR: [0.01, 0.02]}
  - name: kd-lr
    config: kd
    grid: {SOLVER.BASE_LR: [0.01, 0.02]}
  - name: kd-tau
    config: kd
    inherit: [kd-lr]
    grid: {DISTILL.PIXEL_KD.TAU: [1.0, 4.0]}
"""


def _load():
    spec = importlib.util.spec_from_file_location("sweep_under_test", SWEEP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_metric(config, overrides):
    o = dict(zip(overrides[::2], overrides[1::2]))
    bonus = 5.0 if config == "kd.yaml" else 0.0
    return 50.0 + 100 * float(o["SOLVER.BASE_LR"]) + bonus + float(o.get("DISTILL.PIXEL_KD.TAU", 1.0))


# Run in a child process: the second trial kills its own process, as a machine crash or `kill -9` would.
_KILLED_CHILD = """
import json, os, signal, sys
spec = __import__("importlib.util").util.spec_from_file_location("s", sys.argv[1])
sweep = __import__("importlib.util").util.module_from_spec(spec); spec.loader.exec_module(sweep)
calls = []
def fake(config, overrides, output_dir, num_gpus=1):
    calls.append(1)
    with open(os.path.join(sys.argv[3], "calls.txt"), "a") as f:
        f.write(json.dumps([config, [str(x) for x in overrides]]) + "\\n")
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    o = dict(zip(overrides[::2], overrides[1::2]))
    return {"sem_seg": {"mIoU": 50.0 + 100 * float(o["SOLVER.BASE_LR"])}}
sweep.run_trial = fake
sweep.main(["--config-file", sys.argv[2], "--output", sys.argv[3]])
"""


def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML)
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, SWEEP_PY, str(tmp_path / "sweep.yaml"), str(out)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    first = [json.loads(line) for line in (out / "calls.txt").read_text().splitlines()]
    assert len(first) == 2  # one finished trial, one killed mid-trial
    assert (out / "study.db").is_file()

    sweep = _load()
    calls = []

    def fake(config, overrides, output_dir, num_gpus=1):
        calls.append([config, [str(x) for x in overrides]])
        return {"sem_seg": {"mIoU": _fake_metric(config, overrides)}}

    sweep.run_trial = fake
    result = sweep.main(["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(out)])
    # The finished point (student, lr 0.01) is not run again; the killed one (lr 0.02) is.
    assert [c for c in calls if c[0] == "student.yaml"] == [first[1]]
    assert first[0] not in calls
    assert len(calls) == 5  # 1 student + 2 kd-lr + 2 kd-tau
    # kd-tau runs at the best kd learning rate (0.02) found by kd-lr.
    tau_calls = [dict(zip(c[1][::2], c[1][1::2])) for c in calls if "DISTILL.PIXEL_KD.TAU" in c[1]]
    assert [t["SOLVER.BASE_LR"] for t in tau_calls] == ["0.02", "0.02"]
    assert sorted(t["DISTILL.PIXEL_KD.TAU"] for t in tau_calls) == ["1.0", "4.0"]

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [r["stage"] for r in rows].count("student-lr") == 2
    best_student = max(float(r["sem_seg/mIoU"]) for r in rows if r["config"] == "student")
    assert best_student == pytest.approx(53.0)  # the killed child never recorded a value for lr 0.02
    assert result["best"]["kd"]["metric"] == pytest.approx(50 + 2 + 5 + 4)
    assert result["best"]["kd"]["params"] == {"SOLVER.BASE_LR": 0.02, "DISTILL.PIXEL_KD.TAU": 4.0}
    md = (out / "results.md").read_text()
    assert "## Best settings side by side" in md and "| sem_seg/mIoU | 53.00 | 61.00 |" in md
    assert (out / "results.png").stat().st_size > 1000

    calls.clear()
    sweep.main(["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(out)])
    assert calls == []  # everything finished: a rerun trains nothing


def _recording_sweep(tmp_path, text, fails=lambda config, overrides: False):
    """The sweep module with a fake trainer that records each trial's overrides (as a dict) and fails where
    ``fails`` says; and the command-line arguments of a sweep file holding ``text``."""
    (tmp_path / "sweep.yaml").write_text(text)
    sweep = _load()
    calls = []

    def fake(config, overrides, output_dir, num_gpus=1):
        calls.append(dict(zip(overrides[::2], overrides[1::2])))
        if fails(config, overrides):
            raise sweep.TrialFailed("boom")
        return {"sem_seg": {"mIoU": _fake_metric(config, overrides)}}

    sweep.run_trial = fake
    return sweep, calls, ["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / "out")]


def test_failed_trial_is_recorded_not_retried_unless_asked(tmp_path):
    sweep, calls, args = _recording_sweep(
        tmp_path, SWEEP_YAML, fails=lambda config, overrides: config == "student.yaml" and 0.02 in overrides)
    sweep.main(args)
    assert len(calls) == 6
    calls.clear()
    sweep.main(args)
    assert calls == []
    sweep.main(args + ["--retry-failed"])
    assert len(calls) == 1


def test_run_trial_command_resumes_from_the_trial_folder(tmp_path, monkeypatch):
    sweep = _load()
    seen = []

    def fake_run(cmd, cwd, stdout, stderr):
        seen.append(cmd)
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        with open(os.path.join(out, "final_metrics.json"), "w") as f:
            json.dump({"sem_seg": {"mIoU": 12.5}}, f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / "last_checkpoint").write_text("model_0000009.pth")
    metrics = sweep.run_trial("cfg.yaml", ["SOLVER.BASE_LR", 0.01], str(trial_dir))
    assert metrics == {"sem_seg": {"mIoU": 12.5}}
    cmd = seen[0]
    assert cmd[1].endswith("train_net.py") and "--resume" in cmd
    assert cmd[-4:] == ["OUTPUT_DIR", str(trial_dir), "SOLVER.BASE_LR", "0.01"]
    sweep.run_trial("cfg.yaml", [], str(trial_dir))
    assert len(seen) == 1  # final_metrics.json there: not trained again


def test_bad_sweep_file_names_the_problem(tmp_path):
    sweep = _load()
    bad = SWEEP_YAML.replace("inherit: [kd-lr]", "inherit: [nope]")
    (tmp_path / "s.yaml").write_text(bad)
    with pytest.raises(sweep.SweepError, match="inherits 'nope'"):
        sweep.load_sweep(str(tmp_path / "s.yaml"))


def test_final_seeds_train_each_stage_best_again_and_report_mean_and_spread(tmp_path):
    text = SWEEP_YAML.replace("grid: {SOLVER.BASE_LR: [0.01, 0.02]}\n  - name: kd-tau",
                              "grid: {SOLVER.BASE_LR: [0.01, 0.02]}\n    final: false\n  - name: kd-tau")
    assert "final: false" in text
    (tmp_path / "sweep.yaml").write_text(text + "seeds: [7]\nfinal_seeds: [1, 2]\n")
    sweep = _load()
    calls = []

    def fake(config, overrides, output_dir, num_gpus=1):
        o = dict(zip(overrides[::2], overrides[1::2]))
        calls.append((config, o, output_dir))
        metrics = {"sem_seg": {"mIoU": _fake_metric(config, overrides) + float(o["SEED"])}}
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "final_metrics.json"), "w") as f:
            json.dump(metrics, f)
        return metrics

    sweep.run_trial = fake
    out = tmp_path / "out"
    args = ["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(out)]
    result = sweep.main(args)
    tuning = [c for c in calls if c[1]["SEED"] == 7]
    final = [c for c in calls if c[1]["SEED"] != 7]
    assert len(tuning) == 6
    # Each stage's best (student lr 0.02; kd-tau lr 0.02, tau 4) at seeds 1, 2; kd-lr says final: false.
    assert [(c[0], c[1]["SOLVER.BASE_LR"], c[1].get("DISTILL.PIXEL_KD.TAU"), c[1]["SEED"]) for c in final] == [
        ("student.yaml", 0.02, None, 1), ("student.yaml", 0.02, None, 2),
        ("kd.yaml", 0.02, 4.0, 1), ("kd.yaml", 0.02, 4.0, 2)]
    # A final run lives beside its setting's tuning run: same folder, another seed.
    tuned = {c[2] for c in tuning}
    assert all(os.path.join(os.path.dirname(c[2]), "seed7") in tuned for c in final)
    kd_tau = [r for r in result["final"] if r["stage"] == "kd-tau"][0]
    assert kd_tau["values"] == [pytest.approx(50 + 2 + 5 + 4 + 1), pytest.approx(50 + 2 + 5 + 4 + 2)]
    with open(out / "final.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["seed"] for r in rows} == {"1", "2"}
    md = (out / "results.md").read_text()
    assert "## Each stage's best setting at seeds 1, 2" in md
    assert "| kd-tau | kd | DISTILL.PIXEL_KD.TAU=4.0, SOLVER.BASE_LR=0.02 | 62.50 +- 0.71 | 62.00 | 63.00 |" in md

    calls.clear()
    (out / "results.md").unlink()
    sweep.main(args + ["--report-only"])
    assert calls == []  # the report reads the finished final runs, trains nothing
    assert "| kd-tau | kd | DISTILL.PIXEL_KD.TAU=4.0, SOLVER.BASE_LR=0.02 | 62.50 +- 0.71 |" in (out / "results.md").read_text()


def test_a_grid_extended_after_a_run_trains_only_the_new_points(tmp_path):
    sweep, calls, args = _recording_sweep(tmp_path, SWEEP_YAML)
    sweep.main(args)
    assert len(calls) == 6
    calls.clear()
    # A new learning rate in the student's grid: Optuna would refuse to suggest from a changed choice list.
    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML.replace("[0.01, 0.02]}\n  - name: kd-lr",
                                                            "[0.01, 0.02, 0.04]}\n  - name: kd-lr"))
    result = sweep.main(args)
    assert calls == [{"SOLVER.MAX_ITER": 5, "SOLVER.BASE_LR": 0.04}]
    assert result["best"]["student"]["params"] == {"SOLVER.BASE_LR": 0.04}
    assert result["best"]["student"]["metric"] == pytest.approx(55.0)
