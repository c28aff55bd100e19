"""Launch checks, two "machines" on loopback (training, Cityscapes evaluation) and recipes across machines."""
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from selftrain_d2.engine import default_argument_parser, launch_from_args
from selftrain_d2.engine import launch as launch_module
from selftrain_d2.engine.launch import LaunchError
from selftrain_d2.orchestration.recipe import STAGE_REGISTRY, RecipeContext, RecipeError, Stage, parse_recipe, run_recipe

from ..conftest import DEMO_CONFIG, FAST_TRAIN_OPTS, ROOT

CPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_machines(commands):
    """Start the commands at once (one per "machine"), wait for all; their outputs, each asserted to succeed."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(log[-3000:] for log in logs)
    return logs


@pytest.fixture
def launched(monkeypatch):
    """Detectron2's ``launch`` replaced by a recorder: (processes per machine, keyword arguments, GPUs seen)."""
    calls = []

    def fake_launch(main, num_gpus, **kwargs):
        calls.append((num_gpus, kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")))

    monkeypatch.setattr(launch_module, "launch", fake_launch)
    return calls


def _args(*argv):
    return default_argument_parser().parse_args(["--config-file", DEMO_CONFIG, *argv])


def test_several_processes_without_cuda_need_model_device_cpu_explicitly(launched):
    assert not torch.cuda.is_available()
    with pytest.raises(LaunchError, match=r"--num-gpus 2 .*no CUDA GPU and MODEL.DEVICE is 'cuda'.*MODEL.DEVICE cpu"):
        launch_from_args(None, _args("--num-gpus", "2", "MODEL.DEVICE", "cuda"))
    with pytest.raises(LaunchError, match=r"--num-gpus 1 x --num-machines 2 asks for 2 processes"):
        launch_from_args(None, _args("--num-machines", "2", "--dist-url", "tcp://127.0.0.1:1", "MODEL.DEVICE", "cuda"))
    assert launched == []  # refused before anything started
    # MODEL.DEVICE cpu on the command line, or in the YAML chain (the demo configs' base says cpu).
    launch_from_args(None, _args("--num-gpus", "2", "MODEL.DEVICE", "cpu"))
    launch_from_args(None, _args("--num-gpus", "2"))
    # A single process keeps the cuda -> cpu fallback of setup().
    launch_from_args(None, _args("MODEL.DEVICE", "cuda"))
    assert [n for n, _, _ in launched] == [2, 2, 1]


def test_dist_url_defaults_to_auto_and_several_machines_need_a_tcp_url(launched):
    args = _args("--num-gpus", "2")
    assert args.dist_url == "auto"
    launch_from_args(None, args)
    assert launched[0][1] == {"num_machines": 1, "machine_rank": 0, "dist_url": "auto", "args": (args,)}
    with pytest.raises(LaunchError, match=r"--num-machines 2 needs --dist-url tcp://HOST:PORT"):
        launch_from_args(None, _args("--num-machines", "2", "--machine-rank", "1"))
    with pytest.raises(LaunchError, match=r"--machine-rank must be in \[0, 1\].* got 2"):
        launch_from_args(None, _args("--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://h:1"))
    assert len(launched) == 1


def test_cpu_processes_on_a_machine_with_gpus_do_not_see_them(launched, monkeypatch):
    # Detectron2's workers pick NCCL whenever CUDA is available; NCCL cannot reduce the CPU model's tensors.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    launch_from_args(None, _args("--num-gpus", "2", "MODEL.DEVICE", "cpu"))
    assert launched[-1][2] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(LaunchError, match="--num-gpus 2 but this machine has 1 CUDA GPU"):
        launch_from_args(None, _args("--num-gpus", "2", "MODEL.DEVICE", "cuda"))


def test_train_net_refuses_cpu_processes_not_asked_for_before_starting_them(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DEMO_CONFIG, "--num-gpus", "2",
           "MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "train_net: error: --num-gpus 2" in proc.stderr and "MODEL.DEVICE cpu" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_machines_on_loopback_train_and_only_rank_0_saves(tmp_path):
    url = f"tcp://127.0.0.1:{_free_port()}"
    # One output folder per "machine" (local disks): a checkpoint written by rank 1 would show.
    logs = _run_machines([
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DEMO_CONFIG,
         "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url, *FAST_TRAIN_OPTS,
         "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()",
         "OUTPUT_DIR", str(tmp_path / f"machine{rank}")]
        for rank in (0, 1)])
    assert "World size: 2" in logs[0]
    saved = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.pth"))
    assert saved == ["machine0/model_final.pth"]
    assert torch.load(tmp_path / "machine0" / "model_final.pth", weights_only=False)["iteration"] == 2
    metrics = [json.loads(line) for line in open(tmp_path / "machine0" / "metrics.json")]
    assert metrics[-1]["iteration"] == 2 and np.isfinite(metrics[-1]["total_loss"])


# Cityscapes evaluation across machines ----------------------------------------------------------------------

CITY_THINGS = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
H, W = 64, 128


def _cityscapes_samples(n=4):
    """(stem, labelIds, instanceIds) of n scenes: road, sidewalk, building, and two or three cars."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        labels = np.full((H, W), 7, np.uint8)  # road
        labels[: H // 3] = 11  # building
        labels[H // 3: H // 2, : W // 2] = 8  # sidewalk
        instances = labels.astype(np.uint16)
        for k in range(2 + i % 2):
            y, x = int(rng.integers(H // 2, H - 16)), int(rng.integers(0, W - 24))
            labels[y:y + 14, x:x + 22] = 26
            instances[y:y + 14, x:x + 22] = 26 * 1000 + k
        samples.append((f"{('aachen', 'bochum')[i % 2]}_000000_{i:06d}", labels, instances))
    return samples


def _write_cityscapes(root):
    """The ground truth of the samples in Cityscapes' layout: gtFine/val/<city>/*_gtFine_{label,instance}Ids.png."""
    for stem, labels, instances in _cityscapes_samples():
        folder = os.path.join(root, "gtFine", "val", stem.split("_")[0])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(labels).save(os.path.join(folder, f"{stem}_gtFine_labelIds.png"))
        Image.fromarray(instances).save(os.path.join(folder, f"{stem}_gtFine_instanceIds.png"))


def _predictions(stem, labels, instances, i):
    """Imperfect predictions: a mislabelled band, cars found shifted by i pixels, one false car."""
    from cityscapesscripts.helpers.labels import id2label
    from detectron2.structures import Instances

    train_ids = np.vectorize(lambda v: id2label[int(v)].trainId)(labels)
    train_ids[:, i * 5: i * 5 + 6] = 1
    logits = torch.nn.functional.one_hot(torch.from_numpy(train_ids.astype(np.int64)), 19).permute(2, 0, 1).float()
    masks = [np.roll(instances == v, i, axis=1) for v in np.unique(instances) if v >= 1000]
    masks.append(np.zeros((H, W), bool))
    masks[-1][: 12, : 20] = True
    result = Instances((H, W))
    result.pred_masks = torch.from_numpy(np.stack(masks))
    result.pred_classes = torch.full((len(masks),), CITY_THINGS.index("car"))
    result.scores = torch.linspace(0.9, 0.5, len(masks))
    return {"file_name": f"/nowhere/{stem}_leftImg8bit.png"}, {"sem_seg": logits, "instances": result}


def _evaluate_cityscapes(root, name):
    """``build_evaluator`` of a Cityscapes dataset over this process's share of the images (rank 0: results)."""
    from detectron2.data import MetadataCatalog
    from detectron2.utils import comm

    from selftrain_d2.evaluation import build_evaluator

    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(evaluator_type=["cityscapes_sem_seg", "cityscapes_instance"],
                                      gt_dir=os.path.join(root, "gtFine", "val"), thing_classes=CITY_THINGS)
    evaluator = build_evaluator(None, name, output_folder=os.path.join(root, "unused"))
    evaluator.reset()
    for i, (stem, labels, instances) in enumerate(_cityscapes_samples()):
        if i % comm.get_world_size() == comm.get_rank():
            inputs, outputs = _predictions(stem, labels, instances, i)
            evaluator.process([inputs], [outputs])
    return evaluator.evaluate(), comm.get_local_size(), comm.get_world_size()


def _evaluate_and_save(root, name):
    results, local_size, world_size = _evaluate_cityscapes(root, name)
    if results is not None:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump({"results": results, "local_size": local_size, "world_size": world_size}, f)


def _machine(rank, url, root):
    """One "machine": Detectron2's launch of one process in a world of two machines."""
    from detectron2.engine import launch

    launch(_evaluate_and_save, 1, num_machines=2, machine_rank=rank, dist_url=url, args=(root, "test_city_multi"))


@pytest.mark.slow
def test_cityscapes_evaluators_across_machines_match_one_process(tmp_path, monkeypatch):
    _write_cityscapes(str(tmp_path))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    single, _, _ = _evaluate_cityscapes(str(tmp_path), "test_city_single")
    assert os.listdir(workdir) == []  # cityscapesscripts' matches.json goes to the evaluator's temporary folder
    assert 20 < single["sem_seg"]["IoU"] < 95 and 5 < single["segm"]["AP"] < 95  # imperfect, not degenerate

    url = f"tcp://127.0.0.1:{_free_port()}"
    root = str(tmp_path)
    code = "import sys; from tests.engine.test_multinode import _machine; _machine(int(sys.argv[1]), sys.argv[2], sys.argv[3])"
    _run_machines([[sys.executable, "-c", code, str(rank), url, root] for rank in (0, 1)])
    saved = json.load(open(os.path.join(root, "results.json")))
    assert (saved["local_size"], saved["world_size"]) == (1, 2)  # what Detectron2's evaluators assert against
    assert saved["results"]["sem_seg"] == pytest.approx(single["sem_seg"], abs=1e-9)
    assert saved["results"]["segm"] == pytest.approx(single["segm"], abs=1e-9)


# Recipes across machines -------------------------------------------------------------------------------------

RANK_RUNS = {0: [], 1: []}  # (stage name, resume) of every run on each machine rank
BARRIER = threading.Barrier(2, timeout=60)


@STAGE_REGISTRY.register("fake_multinode_training")
class FakeTraining(Stage):
    """Meets the other machine in run(), as a launch would; rank 0 writes the result only after rank 1 left."""

    REQUIRED = ("value",)
    OPTIONAL = ("model",)
    REFS = ("model",)
    DISTRIBUTED = True

    def fingerprint(self):
        return {"value": self.options["value"]}

    def run(self, out_dir, resume):
        RANK_RUNS[self.ctx.machine_rank].append((self.spec.name, resume))
        upstream = self.ctx.results[self.options["model"]]["value"] if self.options.get("model") else 0
        BARRIER.wait()
        if self.ctx.machine_rank == 0:
            BARRIER.wait()  # rank 1 has returned from its run() before this result exists
            with open(os.path.join(out_dir, "value.json"), "w") as f:
                json.dump({"value": self.options["value"] + upstream}, f)
        else:
            BARRIER.wait()

    def collect(self, out_dir):
        with open(os.path.join(out_dir, "value.json")) as f:
            value = json.load(f)["value"]
        return {"dir": out_dir, "value": value, "metrics": {"fake": {"value": float(value)}}}


@STAGE_REGISTRY.register("fake_multinode_index")
class FakeIndex(FakeTraining):
    """A stage of machine rank 0 only (like the centroid index)."""

    DISTRIBUTED = False

    def run(self, out_dir, resume):
        RANK_RUNS[self.ctx.machine_rank].append((self.spec.name, resume))
        upstream = self.ctx.results[self.options["model"]]["value"] if self.options.get("model") else 0
        with open(os.path.join(out_dir, "value.json"), "w") as f:
            json.dump({"value": self.options["value"] + upstream}, f)


def _two_machine_recipe():
    return parse_recipe({"name": "two", "stages": {
        "teacher": {"type": "fake_multinode_training", "value": 1},
        "index": {"type": "fake_multinode_index", "value": 10, "model": "teacher"},
        "student": {"type": "fake_multinode_training", "value": 100, "model": "index"},
    }}, "two.yaml")


def _run_two_machines(out):
    results, errors = {}, []

    def machine(rank):
        try:
            results[rank] = run_recipe(_two_machine_recipe(), out, report=False, num_machines=2, machine_rank=rank,
                                       dist_url="tcp://127.0.0.1:1", wait_timeout=60)
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)
            BARRIER.abort()

    threads = [threading.Thread(target=machine, args=(rank,)) for rank in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_recipe_across_machines_rank_0_keeps_the_records_and_the_others_follow(tmp_path):
    for runs in RANK_RUNS.values():
        runs.clear()
    BARRIER.reset()
    results = _run_two_machines(tmp_path)
    assert RANK_RUNS[0] == [("teacher", False), ("index", False), ("student", False)]
    assert RANK_RUNS[1] == [("teacher", True), ("student", True)]  # rank 0's stages are not run here
    expected = {"teacher": {"fake": {"value": 1.0}}, "index": {"fake": {"value": 11.0}},
                "student": {"fake": {"value": 111.0}}}
    assert results == {0: expected, 1: expected}
    assert json.loads((tmp_path / "summary.json").read_text()) == expected
    # A second run of both machines finds every stage done: nothing runs, nobody waits for a partner.
    for runs in RANK_RUNS.values():
        runs.clear()
    assert _run_two_machines(tmp_path) == {0: expected, 1: expected}
    assert RANK_RUNS == {0: [], 1: []}


def test_recipe_machine_without_rank_0_records_says_the_folder_must_be_shared(tmp_path):
    recipe = parse_recipe({"name": "one", "stages": {"index": {"type": "fake_multinode_index", "value": 1}}},
                          "one.yaml")
    with pytest.raises(RecipeError, match=r"stage 'index': machine rank 0 did not record it done .* shares"):
        run_recipe(recipe, tmp_path, num_machines=2, machine_rank=1, dist_url="tcp://h:1", wait_timeout=0.5)
    assert os.listdir(tmp_path) == []  # machine ranks > 0 write no records, not even a lock or a stage folder
    with pytest.raises(RecipeError, match="--num-machines 2 needs --dist-url tcp://HOST:PORT"):
        run_recipe(recipe, tmp_path, num_machines=2, machine_rank=1)


def test_recipe_stages_pass_the_launch_options_to_every_command(tmp_path, monkeypatch):
    from selftrain_d2.orchestration.recipe import stages

    commands = []
    monkeypatch.setattr(stages, "_run", lambda cmd, what: commands.append([str(c) for c in cmd]))
    recipe = parse_recipe({"name": "r", "stages": {
        "teacher": {"type": "train", "config": DEMO_CONFIG},
        "labels": {"type": "pseudo_labels", "model": "teacher", "input": "demo_city_unlabeled_sem_seg"},
        "eval": {"type": "evaluate", "model": "teacher", "datasets": ["demo_city_val_sem_seg"]},
    }}, os.path.join(ROOT, "configs", "demo", "r.yaml"))
    ctx = RecipeContext(recipe, tmp_path, num_gpus=4, num_machines=2, machine_rank=1, dist_url="tcp://10.0.0.1:5000")
    ctx.results["teacher"] = {"config": DEMO_CONFIG, "weights": "/w/model_final.pth"}
    for spec in recipe.stages:
        STAGE_REGISTRY.get(spec.type)(spec, ctx).run(str(tmp_path / spec.name), resume=False)
    assert len(commands) == 3
    for cmd in commands:
        i = cmd.index("--num-gpus")
        assert cmd[i:i + 8] == ["--num-gpus", "4", "--num-machines", "2", "--machine-rank", "1",
                                "--dist-url", "tcp://10.0.0.1:5000"]
