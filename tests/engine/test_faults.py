"""Fault injection: kills while checkpoints are written, broken and hostile weight files, killed recipes.

Kills are real: a training (or a recipe) runs in a subprocess through a wrapper script written by the test,
whose ``torch.save`` writes half of the final checkpoint and then SIGKILLs its own process.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from selftrain_d2.orchestration.recipe import RecipeError, parse_recipe, run_recipe
from selftrain_d2.orchestration.recipe import stages as stages_module

try:
    from selftrain_d2.utils.safe_load import UnsafeWeightsError
except ImportError:  # the code before safe loading: the tests fail on what they check, not on this import
    UnsafeWeightsError = type("UnsafeWeightsError", (Exception,), {})

from ..conftest import DEMO_CONFIG, FAST_TRAIN_OPTS, ROOT

CPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
# MAX_ITER 4 with CHECKPOINT_PERIOD 2: the last periodic checkpoint and model_final are saved at iteration 3.
TINY = FAST_TRAIN_OPTS + ["DATASETS.TEST", "()", "MODEL.DEVICE", "cpu", "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]

KILLING_PYTHON = """\
#!{python}
# Runs a script (argv[1]) like python would, with a torch.save that, the first time it writes model_final
# (whatever the file object's name), writes half of the bytes, then SIGKILLs this process.
import io, os, runpy, signal, sys
import torch

real_save = torch.save
marker = {marker!r}

def target_name(f):
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return os.readlink(f"/proc/self/fd/{{f.fileno()}}")

def save(obj, f, *args, **kwargs):
    if "model_final" in os.path.basename(target_name(f)) and not os.path.exists(marker):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        open(marker, "w").close()
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
if sys.argv[1] == "-m":  # python -m MODULE ARGS (how recipes start a command)
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:  # python SCRIPT ARGS
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _killing_python(tmp_path):
    """An executable that behaves as ``python`` but is killed half-way through writing model_final.pth (once:
    a marker file remembers the kill)."""
    path = tmp_path / "killing_python"
    path.write_text(KILLING_PYTHON.format(python=sys.executable, marker=str(tmp_path / "killed_once")))
    path.chmod(0o755)
    return str(path)


def _train_net(python, out, *extra):
    cmd = [python, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DEMO_CONFIG, *extra, *TINY,
           "OUTPUT_DIR", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=600)


def _loads(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_model(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------- checkpoints and resume

@pytest.mark.slow
def test_kill_while_model_final_is_written_then_resume_leaves_a_final_checkpoint_that_loads(tmp_path):
    out = tmp_path / "out"
    killed = _train_net(_killing_python(tmp_path), out)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert (tmp_path / "killed_once").exists()
    final = out / "model_final.pth"
    # Written to a temporary name: the final file is absent, never truncated.
    assert not final.exists() or _loads(final) is not None

    resumed = _train_net(sys.executable, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = _loads(final)
    assert state["iteration"] == 3
    _same_model(state["model"], _loads(out / "model_0000003.pth")["model"])
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # the interrupted save's file is removed

    # A final checkpoint truncated by an older version (fvcore wrote in place, and last_checkpoint still named
    # the last periodic one) is written again from the restored state.
    final.write_bytes(final.read_bytes()[:64])
    (out / "last_checkpoint").write_text("model_0000003.pth")
    repaired = _train_net(sys.executable, out, "--resume")
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "writing it again from the restored state" in repaired.stdout + repaired.stderr
    _same_model(_loads(final)["model"], state["model"])


def _checkpointer(fast_cfg, folder, seed=0):
    from selftrain_d2.engine.checkpoint import build_checkpointer

    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return build_checkpointer(fast_cfg(), model, str(folder)), model


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(fast_cfg, tmp_path, caplog):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    saver, model = _checkpointer(fast_cfg, folder)
    saved = {}
    for it in (1, 3, 5):
        with torch.no_grad():
            model.weight.fill_(it)
        saver.save(f"model_{it:07d}", iteration=it)
        saved[it] = model.weight.detach().clone()
        time.sleep(0.01)  # distinct modification times
    newest = folder / "model_0000005.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    loader, fresh = _checkpointer(fast_cfg, folder, seed=1)
    with caplog.at_level("WARNING"):
        rest = loader.resume_or_load("", resume=True)
    assert rest["iteration"] == 3
    torch.testing.assert_close(fresh.weight, saved[3])
    assert "names " + str(newest) + ", which does not load" in caplog.text
    assert "resuming from " + str(folder / "model_0000003.pth") in caplog.text

    # An empty last_checkpoint (fvcore wrote it in place) is the same case.
    (folder / "last_checkpoint").write_text("")
    loader, fresh = _checkpointer(fast_cfg, folder, seed=2)
    assert loader.resume_or_load("", resume=True)["iteration"] == 3

    # Nothing loads: an error naming the files, not a silent fresh start.
    for name in ("model_0000001.pth", "model_0000003.pth"):
        (folder / name).write_bytes(b"")
    loader, _ = _checkpointer(fast_cfg, folder, seed=3)
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* loads") as error:
        loader.resume_or_load("", resume=True)
    assert all(f"model_000000{it}.pth: not a readable checkpoint" in str(error.value) for it in (1, 3, 5))


def test_ensure_loadable_writes_only_a_missing_or_broken_checkpoint(fast_cfg, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    saver, _ = _checkpointer(fast_cfg, folder)
    final = folder / "model_final.pth"
    saver.ensure_loadable("model_final", iteration=3)
    assert _loads(final)["iteration"] == 3
    saver.ensure_loadable("model_final", iteration=4)
    assert _loads(final)["iteration"] == 3  # it loads: left alone
    final.write_bytes(final.read_bytes()[:100])
    saver.ensure_loadable("model_final", iteration=5)
    assert _loads(final)["iteration"] == 5


def test_checkpoint_and_last_checkpoint_are_never_half_written(fast_cfg, tmp_path, monkeypatch):
    """An error (as a kill would) while saving leaves the previous checkpoint and last_checkpoint as they were."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    saver, _ = _checkpointer(fast_cfg, folder)
    saver.save("model_final", iteration=1)
    good = (folder / "model_final.pth").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        saver.save("model_final", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert (folder / "model_final.pth").read_bytes() == good
    assert (folder / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(folder)) == ["last_checkpoint", "model_final.pth"]


# ------------------------------------------------------------------------------------------------- recipes

@pytest.mark.slow
def test_kill_while_a_recipe_stage_writes_model_final_then_rerun_repairs_the_stage(tmp_path):
    out = tmp_path / "recipe"
    opts = TINY + ["SOLVER.MAX_ITER", "2"]  # saves model_0000001 and model_final at iteration 1
    stage = {"type": "train", "config": DEMO_CONFIG, "opts": opts}
    recipe = parse_recipe({"name": "kill", "stages": {"teacher": stage}}, str(tmp_path / "kill.yaml"))
    with pytest.raises(RecipeError, match="exit status -9"):
        run_recipe(recipe, out, python=_killing_python(tmp_path), report=False)
    assert not (out / "teacher" / "stage.json").exists()
    run_recipe(recipe, out, python=sys.executable, report=False)
    assert json.loads((out / "teacher" / "stage.json").read_text())["type"] == "train"
    assert _loads(out / "teacher" / "model_final.pth")["iteration"] == 1


def _fake_training(final_bytes):
    """A stand-in for train_net.py in stages._run: writes model_final.pth (``final_bytes`` of it) and exits 0."""
    calls = []

    def run(cmd, what):
        calls.append([str(c) for c in cmd])
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        path = os.path.join(out, "model_final.pth")
        torch.save({"model": {"w": torch.ones(256)}, "iteration": 3}, path)
        with open(path, "rb+") as f:
            f.truncate(final_bytes(os.path.getsize(path)))

    return run, calls


def test_a_stage_is_done_only_when_its_final_weights_load(tmp_path, monkeypatch):
    recipe = parse_recipe({"name": "r", "stages": {"teacher": {"type": "train", "config": DEMO_CONFIG}}},
                          str(tmp_path / "r.yaml"))
    out = tmp_path / "out"
    run, calls = _fake_training(lambda size: size // 2)
    monkeypatch.setattr(stages_module, "_run", run)
    with pytest.raises(RecipeError, match=r"stage 'teacher' ended, but .*model_final\.pth: not a readable checkpoint"):
        run_recipe(recipe, out, report=False)
    assert not (out / "teacher" / "stage.json").exists()

    run, calls = _fake_training(lambda size: size)
    monkeypatch.setattr(stages_module, "_run", run)
    run_recipe(recipe, out, report=False)
    assert "--resume" in calls[0] and (out / "teacher" / "stage.json").exists()

    # Recorded done, but the weights broke since: resumed, not skipped.
    final = out / "teacher" / "model_final.pth"
    final.write_bytes(final.read_bytes()[:64])
    run, calls = _fake_training(lambda size: size)
    monkeypatch.setattr(stages_module, "_run", run)
    run_recipe(recipe, out, report=False)
    assert len(calls) == 1 and "--resume" in calls[0]
    assert _loads(final)["iteration"] == 3
    run, calls = _fake_training(lambda size: size)
    monkeypatch.setattr(stages_module, "_run", run)
    run_recipe(recipe, out, report=False)
    assert calls == []


SLEEPER_RECIPE = """\
import os, sys
sys.path.insert(0, {root!r})
from selftrain_d2.orchestration.recipe import STAGE_REGISTRY, Stage, parse_recipe, run_recipe, runner, stages

runner.ORPHAN_WAIT_S = float(os.environ["ORPHAN_WAIT_S"])
CHILD = '''
import os, sys, time
folder = sys.argv[1]
if os.path.exists(os.path.join(folder, "quick")):
    sys.exit(0)
if os.fork() == 0:  # a process of the stage that outlives it, as a stuck worker would, holding what it inherited
    open(os.path.join(folder, "grandchild.pid"), "w").write(str(os.getpid()))
    while not os.path.exists(os.path.join(folder, "release")):
        time.sleep(0.05)
    os._exit(0)
open(os.path.join(folder, "child.pid"), "w").write(str(os.getpid()))
time.sleep(600)
'''


@STAGE_REGISTRY.register("fault_sleeper")
class Sleeper(Stage):
    REQUIRED = ("folder",)

    def fingerprint(self):
        return {{}}

    def run(self, out_dir, resume):
        stages._run([sys.executable, "-c", CHILD, self.options["folder"]], "stage 'sleeper' (test)")

    def collect(self, out_dir):
        return {{}}


recipe = parse_recipe({{"name": "sleep", "stages": {{"sleeper": {{"type": "fault_sleeper", "folder": sys.argv[1]}}}}}},
                      "sleep.yaml")
run_recipe(recipe, sys.argv[2], report=False)
print("recipe finished")
"""


def _alive(pid):
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
@pytest.mark.slow
def test_kill_9_of_the_recipe_kills_its_stage_and_a_rerun_never_runs_beside_an_orphan(tmp_path):
    script = tmp_path / "sleeper_recipe.py"
    script.write_text(SLEEPER_RECIPE.format(root=ROOT))
    folder, out = tmp_path / "pids", tmp_path / "out"
    folder.mkdir()

    def recipe(wait_s):
        return [sys.executable, str(script), str(folder), str(out)], dict(CPU_ENV, ORPHAN_WAIT_S=str(wait_s))

    cmd, env = recipe(30)
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = []
    try:
        assert _wait_for(lambda: (folder / "child.pid").exists() and (folder / "grandchild.pid").exists(), 120), \
            parent.communicate(timeout=5)[0] if parent.poll() is not None else "no stage started"
        child, grandchild = (int((folder / f"{n}.pid").read_text()) for n in ("child", "grandchild"))
        started += [child, grandchild]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _alive(child), 5), "the stage process outlived the recipe killed with -9"

        # A process of the stage still lives and holds the lock: a rerun waits for it, then refuses.
        (folder / "quick").write_text("")  # a rerun's stage would end at once
        cmd, env = recipe(1)
        refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "recipe finished" not in refused.stdout
        assert "was killed, but processes it started still run" in refused.stderr, refused.stderr[-3000:]
        assert f"process group {child}" in refused.stderr
        assert _alive(grandchild)

        # Once it ends (here while the rerun waits), the rerun goes ahead.
        cmd, env = recipe(120)
        log = tmp_path / "rerun.log"
        with open(log, "w") as f:
            rerun = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        assert _wait_for(lambda: "waiting up to" in log.read_text() or rerun.poll() is not None, 120)
        assert rerun.poll() is None, log.read_text()[-3000:]
        (folder / "release").write_text("")
        rerun.wait(timeout=300)
        assert rerun.returncode == 0 and "recipe finished" in log.read_text(), log.read_text()[-3000:]
        assert not _alive(grandchild)
    finally:
        (folder / "release").write_text("")
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


# ------------------------------------------------------------------------------------------- hostile files

class _CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs what the file says."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "selftrain_d2", "cli", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_only(weights, tmp_path):
    from selftrain_d2.engine import default_argument_parser

    args = default_argument_parser().parse_args(["--config-file", DEMO_CONFIG, "--eval-only", *TINY, "OUTPUT_DIR",
                                                 str(tmp_path / "out"), "MODEL.WEIGHTS", str(weights)])
    return _tool("train_net").run(args)


def _generate_pseudo_labels(weights, tmp_path):
    from detectron2.data import DatasetCatalog

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    image = DatasetCatalog.get("demo_city_unlabeled_sem_seg")[0]["file_name"]
    os.symlink(image, folder / os.path.basename(image))
    module = _tool("generate_pseudo_labels")
    args = module.parse_args(["--config-file", DEMO_CONFIG, "--input", str(folder), "--output", str(tmp_path / "out"),
                              *TINY, "MODEL.WEIGHTS", str(weights)])
    return module.run(args)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
@pytest.mark.parametrize("tool", [_eval_only, _generate_pseudo_labels])
def test_hostile_weights_run_nothing_and_the_error_names_the_file(tmp_path, monkeypatch, suffix, tool):
    # As on a machine where torch's weights_only default is off (older torch, or this variable set).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    weights = tmp_path / f"evil{suffix}"
    payload = {"model": {"w": np.zeros(2, np.float32)}, "__author__": "x", "payload": _CreatesFile(str(marker))}
    if suffix == ".pkl":
        weights.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        payload["model"] = {"w": torch.zeros(2)}
        torch.save(payload, weights)
    with pytest.raises(Exception) as error:
        tool(weights, tmp_path)
    assert not marker.exists()
    assert isinstance(error.value, UnsafeWeightsError), error.value
    assert str(weights) in str(error.value) and "open" in str(error.value)


def test_restricted_unpickler_refuses_globals_and_codecs_it_does_not_need(tmp_path):
    from selftrain_d2.utils.safe_load import load_pickle_weights

    path = tmp_path / "system.pkl"
    path.write_bytes(pickle.dumps({"x": _CreatesFile(str(tmp_path / "m"))}, protocol=0))
    with pytest.raises(UnsafeWeightsError, match=r"system\.pkl: refused to load global .*open"):
        load_pickle_weights(str(path))
    # _codecs.encode is admitted for protocol-2 bytes, with latin1 only.
    crafted = b"\x80\x02c_codecs\nencode\nq\x00X\x02\x00\x00\x0061q\x01X\x03\x00\x00\x00hexq\x02\x86q\x03Rq\x04."
    path.write_bytes(crafted)
    with pytest.raises(RuntimeError, match=r"system\.pkl.*only latin1"):
        load_pickle_weights(str(path))
    assert not (tmp_path / "m").exists()


def _numpy_state(model):
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("style", ["detectron2", "mask2former"])
def test_model_zoo_pkl_loads_into_a_model(fast_cfg, tmp_path, style):
    from selftrain_d2.engine import Trainer
    from selftrain_d2.engine.checkpoint import build_checkpointer

    cfg = fast_cfg("MODEL.EFFICIENTNET_LITE.PRETRAINED", "False")
    torch.manual_seed(0)
    source = Trainer.build_model(cfg)
    if style == "detectron2":  # Detectron2 model zoo: numpy arrays, protocol 2, no name matching
        data, protocol = {"model": _numpy_state(source), "__author__": "Detectron2 Model Zoo"}, 2
    else:  # Mask2Former's converted weights: numpy arrays, matched to the model by name heuristics
        data = {"model": _numpy_state(source), "__author__": "third_party", "matching_heuristics": True}
        protocol = pickle.HIGHEST_PROTOCOL
    path = tmp_path / f"{style}.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    torch.manual_seed(1)
    target = Trainer.build_model(cfg)
    build_checkpointer(cfg, target, str(tmp_path)).load(str(path))
    expected = source.state_dict()
    for k, v in target.state_dict().items():
        if k.endswith("num_batches_tracked") and style == "mask2former":
            continue  # Detectron2's name matching leaves these counters alone
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
