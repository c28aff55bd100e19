"""The sweep (selftrain_d2.orchestration.sweep, tools/sweep.py): the staged protocol, resume after a kill without redoing finished trials, reports."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT
from ..helpers import run_together

SWEEP_PY = os.path.join(ROOT, "selftrain_d2", "orchestration", "sweep.py")

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
def fake(config, overrides, output_dir, num_gpus=1, **dist):
    calls.append(1)
    with open(os.path.join(sys.argv[3], "calls.txt"), "a") as f:
        f.write(json.dumps([config, [str(x) for x in overrides]]) + "\\n")
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    o = dict(zip(overrides[::2], overrides[1::2]))
    return {"sem_seg": {"mIoU": 50.0 + 100 * float(o["SOLVER.BASE_LR"])}}
sweep.run_trial = fake
sweep.run(["--config-file", sys.argv[2], "--output", sys.argv[3]])
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

    def fake(config, overrides, output_dir, num_gpus=1, **dist):
        calls.append([config, [str(x) for x in overrides]])
        return {"sem_seg": {"mIoU": _fake_metric(config, overrides)}}

    sweep.run_trial = fake
    result = sweep.run(["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(out)])
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
    sweep.run(["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(out)])
    assert calls == []  # everything finished: a rerun trains nothing


def _recording_sweep(tmp_path, text, fails=lambda config, overrides: False):
    """The sweep module with a fake trainer that records each trial's overrides (as a dict) and fails where
    ``fails`` says; and the command-line arguments of a sweep file holding ``text``."""
    (tmp_path / "sweep.yaml").write_text(text)
    sweep = _load()
    calls = []

    def fake(config, overrides, output_dir, num_gpus=1, **dist):
        calls.append(dict(zip(overrides[::2], overrides[1::2])))
        if fails(config, overrides):
            raise sweep.TrialFailed("boom")
        return {"sem_seg": {"mIoU": _fake_metric(config, overrides)}}

    sweep.run_trial = fake
    return sweep, calls, ["--config-file", str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / "out")]


def test_failed_trial_is_recorded_not_retried_unless_asked(tmp_path):
    sweep, calls, args = _recording_sweep(
        tmp_path, SWEEP_YAML, fails=lambda config, overrides: config == "student.yaml" and 0.02 in overrides)
    sweep.run(args)
    assert len(calls) == 6
    calls.clear()
    sweep.run(args)
    assert calls == []
    sweep.run(args + ["--retry-failed"])
    assert len(calls) == 1


def test_run_trial_command_resumes_from_the_trial_folder(tmp_path, monkeypatch):
    sweep = _load()
    seen = []

    def fake_run(cmd, env, stdout, stderr):
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
    assert cmd[1:3] == ["-m", "selftrain_d2.cli.train_net"] and "--resume" in cmd
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

    def fake(config, overrides, output_dir, num_gpus=1, **dist):
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
    result = sweep.run(args)
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
    sweep.run(args + ["--report-only"])
    assert calls == []  # the report reads the finished final runs, trains nothing
    md = (out / "results.md").read_text()
    assert "| kd-tau | kd | DISTILL.PIXEL_KD.TAU=4.0, SOLVER.BASE_LR=0.02 | 62.50 +- 0.71 |" in md


def test_a_grid_extended_after_a_run_trains_only_the_new_points(tmp_path):
    sweep, calls, args = _recording_sweep(tmp_path, SWEEP_YAML)
    sweep.run(args)
    assert len(calls) == 6
    calls.clear()
    # A new learning rate in the student's grid: Optuna would refuse to suggest from a changed choice list.
    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML.replace("[0.01, 0.02]}\n  - name: kd-lr",
                                                            "[0.01, 0.02, 0.04]}\n  - name: kd-lr"))
    result = sweep.run(args)
    assert calls == [{"SOLVER.MAX_ITER": 5, "SOLVER.BASE_LR": 0.04}]
    assert result["best"]["student"]["params"] == {"SOLVER.BASE_LR": 0.04}
    assert result["best"]["student"]["metric"] == pytest.approx(55.0)


def test_run_trial_forwards_the_machines_of_a_trial(tmp_path, monkeypatch):
    sweep = _load()
    seen = []

    def fake_run(cmd, env, stdout, stderr):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if len(seen) < 3 else 1)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    with pytest.raises(sweep.TrialFailed, match="exit code 0"):  # rank 0 must leave final_metrics.json
        sweep.run_trial("cfg.yaml", [], str(tmp_path / "a"))
    assert seen[0][3:13] == ["--config-file", "cfg.yaml", "--num-gpus", "1", "--num-machines", "1",
                             "--machine-rank", "0", "--dist-url", "auto"]
    # Another machine's part of a training: rank 0's resume decision, and rank 0 writes the metrics.
    assert sweep.run_trial("cfg.yaml", ["SEED", 7], str(tmp_path / "b"), 2, resume=True, num_machines=2,
                           machine_rank=1, dist_url="tcp://10.0.0.1:2345") is None
    assert seen[1][3:14] == ["--config-file", "cfg.yaml", "--num-gpus", "2", "--num-machines", "2",
                             "--machine-rank", "1", "--dist-url", "tcp://10.0.0.1:2345", "--resume"]
    with pytest.raises(sweep.TrialFailed, match="exit code 1"):
        sweep.run_trial("cfg.yaml", [], str(tmp_path / "c"), num_machines=2, machine_rank=1, dist_url="tcp://h:1")


def test_several_machines_need_a_dist_url_they_can_all_reach(tmp_path, capsys):
    sweep, calls, args = _recording_sweep(tmp_path, SWEEP_YAML)
    with pytest.raises(SystemExit):
        sweep.run(args + ["--num-machines", "2", "--machine-rank", "1"])
    assert "--num-machines 2 needs --dist-url tcp://HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.run(args + ["--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://h:1"])
    assert "--machine-rank must be in [0, 1]" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "out" / "study.db").exists()


# One machine of a two-machine sweep: a fake training that, like torch.distributed's rendezvous, does not end
# before the other machine's part of the same training has started.
_MACHINE = """
import hashlib, json, os, sys, time
spec = __import__("importlib.util").util.spec_from_file_location("s", sys.argv[1])
sweep = __import__("importlib.util").util.module_from_spec(spec); spec.loader.exec_module(sweep)
sweep.POLL_SECONDS = 0.1
calls, rendezvous, output = sys.argv[2], sys.argv[3], sys.argv[7]
def fake(config, overrides, output_dir, num_gpus=1, resume=None, num_machines=1, machine_rank=0, dist_url="auto"):
    folder, overrides = os.path.relpath(output_dir, output), [str(x) for x in overrides]
    with open(calls, "a") as f:
        f.write(json.dumps([machine_rank, config, overrides, folder, resume, num_gpus, num_machines, dist_url]) + "\\n")
    tag = os.path.join(rendezvous, hashlib.sha1((folder + str(overrides)).encode()).hexdigest())
    open(f"{tag}.{machine_rank}", "x").close()
    deadline = time.time() + 30
    while not os.path.exists(f"{tag}.{1 - machine_rank}"):
        if time.time() > deadline:
            raise sweep.TrialFailed(f"machine {1 - machine_rank} never joined {folder}")
        time.sleep(0.02)
    o = dict(zip(overrides[::2], overrides[1::2]))
    return {"sem_seg": {"mIoU": 50.0 + 100 * float(o["SOLVER.BASE_LR"])}} if machine_rank == 0 else None
sweep.run_trial = fake
sweep.run(sys.argv[4:])
"""


def test_every_machine_of_a_trial_trains_it(tmp_path):
    two_stages = SWEEP_YAML.split("  - name: kd-tau")[0]
    (tmp_path / "sweep.yaml").write_text(two_stages + "seeds: [7, 8]\nfinal_seeds: [1]\n")
    (tmp_path / "rendezvous").mkdir()
    calls = tmp_path / "calls.jsonl"
    url = "tcp://127.0.0.1:29517"
    machines = [[sys.executable, "-c", _MACHINE, SWEEP_PY, str(calls), str(tmp_path / "rendezvous"),
                 "--config-file", str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / f"machine{rank}"),
                 "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--num-gpus", "2", "--num-machines", "2",
                 "--machine-rank", str(rank), "--dist-url", url] for rank in (0, 1)]
    codes, logs, _ = run_together(machines, timeout=120)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    trained = [json.loads(line) for line in calls.read_text().splitlines()]
    by_rank = [sorted(json.dumps(c[1:]) for c in trained if c[0] == rank) for rank in (0, 1)]
    # 2 stages x 2 points x 2 seeds, then 2 stages' best at 1 seed: each run by both machines, once, the same.
    assert len(by_rank[0]) == 10 and len(set(by_rank[0])) == 10
    assert by_rank[1] == by_rank[0]
    assert all(c[5:] == [2, 2, url] and c[3].startswith("trials" + os.sep) for c in trained)
    with open(tmp_path / "machine0" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    with open(tmp_path / "machine0" / "final.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


# One of two sweep processes sharing a study: both start together; the one given "die" kills itself (as a
# crashed machine would) in the middle of its first trial, once the other has trained nothing new for 2 s
# (it is waiting for the dying one's trial).
_SHARING = """
import json, os, signal, sys, time
spec = __import__("importlib.util").util.spec_from_file_location("s", sys.argv[1])
sweep = __import__("importlib.util").util.module_from_spec(spec); spec.loader.exec_module(sweep)
sweep.POLL_SECONDS = 0.1
calls, ready, die = sys.argv[2], sys.argv[3], sys.argv[4] == "die"
def fake(config, overrides, output_dir, num_gpus=1, **dist):
    with open(calls, "a") as f:
        f.write(json.dumps([os.getpid(), config, [str(x) for x in overrides]]) + "\\n")
    if die:
        count, since = -1, time.time()
        while time.time() - since < 2:
            with open(calls) as f:
                lines = len(f.readlines())
            if lines != count:
                count, since = lines, time.time()
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    o = dict(zip(overrides[::2], overrides[1::2]))
    return {"sem_seg": {"mIoU": 50.0 + 100 * float(o["SOLVER.BASE_LR"])}}
sweep.run_trial = fake
open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < 2:
    time.sleep(0.01)
sweep.run(sys.argv[5:])
"""


def test_a_process_that_dies_leaves_its_point_to_the_one_still_running(tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML)
    (tmp_path / "ready").mkdir()
    calls = tmp_path / "calls.jsonl"
    codes, logs, pids = run_together(
        [[sys.executable, "-c", _SHARING, SWEEP_PY, str(calls), str(tmp_path / "ready"), role, "--config-file",
          str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / role), "--storage",
          f"sqlite:///{tmp_path / 'study.db'}"] for role in ("die", "live")], timeout=90)
    assert codes == [-9, 0], "\n".join(log[-3000:] for log in logs)
    trained = [json.loads(line) for line in calls.read_text().splitlines()]
    died = [c[1:] for c in trained if c[0] == pids[0]]
    assert len(died) == 1
    # The survivor did not stop at its last point: it waited for the dead one's trial, failed it and trained it.
    assert died[0] in [c[1:] for c in trained if c[0] == pids[1]]
    assert len(trained) == 7
    with open(tmp_path / "live" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_a_postgresql_storage_without_its_driver_says_what_to_install(tmp_path, monkeypatch):
    sweep = _load()
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # import psycopg2 fails
    with pytest.raises(sweep.SweepError, match=r"--storage postgresql://sweep:\*\*\*@db/s: no PostgreSQL driver.*"
                                               r"psycopg2-binary"):
        sweep.StudyLocks("postgresql://sweep:secret@db/s", str(tmp_path))
