"""Stage types of a recipe, chosen by name (``type:`` in the recipe file).

A stage type knows which options it takes, what its result depends on (``fingerprint``: hashed with the
fingerprints of the stages it uses, so a change anywhere upstream reruns it), how to run into its own
folder (resuming when asked), and what it leaves there (``collect``: weights, config, metrics, datasets).
Training and labelling run as subprocesses of the project's own commands (``selftrain_d2.cli``), so every stage's log, checkpoints
and launch (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``) are exactly those of the
command a user would type. Such stages are ``DISTRIBUTED``: in a recipe across machines, every machine runs
them together; the others run on machine rank 0 only (see ``runner``).

A stage command never outlives the recipe: it runs in its own process group, which is killed when the recipe
is interrupted; on Linux the kernel kills it when the recipe process dies (``kill -9`` included); and it
inherits the recipe's lock on the output folder (:data:`OUTPUT_LOCK`), so the folder stays locked while any
process of it lives.
"""
import contextlib
import contextvars
import ctypes
import logging
import os
import signal
import subprocess
import sys

from ..commands import command, command_env, read_metrics, resolve_path
from ...pseudo_labels.folder import PseudoLabelFolder
from ...utils.registry import NamedRegistry
from ...utils.safe_load import weights_file_problem
from .errors import RecipeError

__all__ = ["OUTPUT_LOCK", "STAGE_REGISTRY", "RecipeContext", "Stage"]

# The open lock file of the recipe output folder while this process (thread) holds it (set by the runner);
# stage commands inherit it.
OUTPUT_LOCK = contextvars.ContextVar("selftrain_recipe_output_lock", default=None)

logger = logging.getLogger(__name__)

STAGE_REGISTRY = NamedRegistry("RECIPE_STAGE")
STAGE_REGISTRY.__doc__ = "Recipe stage types, by the name used as ``type:`` in recipe files."


class RecipeContext:
    """What stages share: the recipe, the output root, overrides for every config, and earlier results."""

    def __init__(self, recipe, output_dir, opts=(), num_gpus=1, python=None, num_machines=1, machine_rank=0,
                 dist_url="auto"):
        self.recipe = recipe
        self.output_dir = os.path.abspath(output_dir)
        self.opts = list(opts)
        self.num_gpus = num_gpus
        self.num_machines = num_machines
        self.machine_rank = machine_rank
        self.dist_url = dist_url
        self.python = python or sys.executable
        self.results = {}  # stage name -> collect() dict of a finished stage

    def launch_args(self):
        """The launch options of every training and labelling command."""
        return ["--num-gpus", self.num_gpus, "--num-machines", self.num_machines, "--machine-rank", self.machine_rank,
                "--dist-url", self.dist_url]

    def stage_dir(self, name):
        return os.path.join(self.output_dir, name)

    def config_path(self, path):
        """A config path from the recipe: relative to the recipe file's folder, else to the current one."""
        return resolve_path(path, relative_to=self.recipe.path)

    def result(self, name, key):
        value = self.results[name].get(key)
        if value is None:
            raise RecipeError(f"stage {name!r} left no {key!r} (it is used by a later stage)")
        return value


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_PR_SET_PDEATHSIG = 1


def _die_with_this_process():
    """A ``preexec_fn`` after which the kernel sends SIGKILL to the child when this process dies (Linux
    ``PR_SET_PDEATHSIG``); ``None`` where there is no ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dynamic loading after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec():
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the recipe died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _run(cmd, what):
    logger.info("Running %s:\n  %s", what, " ".join(map(str, cmd)))
    lock = OUTPUT_LOCK.get()
    proc = subprocess.Popen([str(c) for c in cmd], env=command_env(), start_new_session=True,
                            preexec_fn=_die_with_this_process(), pass_fds=(lock.fileno(),) if lock else ())
    if lock is not None:
        lock.write(f"{what}: pid {proc.pid}, process group {proc.pid}\n")
        lock.flush()
    try:
        returncode = proc.wait()
    except BaseException:
        # Ctrl-C or an error here: the stage, and whatever it started, stop with the recipe.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if returncode != 0:
        raise RecipeError(f"{what} failed with exit status {returncode}; its log is above")


def _opts_as_strings(opts, where):
    if len(opts) % 2:
        raise RecipeError(f"{where}: opts must be KEY VALUE pairs, got an odd number of items: {opts}")
    return [str(o) if not isinstance(o, (list, tuple)) else repr(o) for o in opts]


class Stage:
    """Base class; subclasses declare ``REQUIRED`` and ``OPTIONAL`` option names, and in ``REFS`` those of
    them whose values name earlier stages (one name or a list)."""

    REQUIRED = ()
    OPTIONAL = ()
    REFS = ()
    DISTRIBUTED = False  # True: run() launches a command that every machine of the recipe runs together

    def __init__(self, spec, ctx):
        self.spec = spec
        self.ctx = ctx
        self.options = spec.options

    @classmethod
    def check_options(cls, name, options, where):
        missing = [k for k in cls.REQUIRED if k not in options]
        unknown = [k for k in options if k not in cls.REQUIRED + cls.OPTIONAL]
        if missing or unknown:
            raise RecipeError(
                f"{where}: stage {name!r} ({cls.__name__}): "
                + (f"missing {missing}; " if missing else "")
                + (f"unknown {unknown}; " if unknown else "")
                + f"takes {list(cls.REQUIRED)} and optionally {list(cls.OPTIONAL)}"
            )
        if "opts" in options:
            _opts_as_strings(list(options["opts"]), f"{where}: stage {name!r}")

    @property
    def opts(self):
        return _opts_as_strings(list(self.options.get("opts", [])), f"stage {self.spec.name!r}")

    def dependencies(self):
        deps = []
        for key in self.REFS:
            deps.extend(_as_list(self.options.get(key)))
        return deps

    def fingerprint(self):
        raise NotImplementedError

    def run(self, out_dir, resume):
        raise NotImplementedError

    def collect(self, out_dir):
        raise NotImplementedError

    def result_problem(self, out_dir):
        """``None`` when what the stage leaves in ``out_dir`` is complete, else what is wrong; the runner
        records a stage done only then, and runs a done stage again (resuming) when it is not."""
        return None


def config_delta(config_file, opts):
    """The settings of a config (with ``opts``) that differ from the defaults, as sorted ``KEY: value`` lines.

    What a stage's hash is built from: keys added to the package later (with defaults that keep old behaviour)
    do not invalidate finished stages. A changed default does not either; rerun such stages by hand
    (delete their folder)."""
    from ...config import get_selftrain_cfg, load_config

    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            name = f"{prefix}{key}"
            out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
        return out

    merged, defaults = flat(load_config(config_file, opts)), flat(get_selftrain_cfg())
    return sorted(f"{k}: {v!r}" for k, v in merged.items() if k not in defaults or defaults[k] != v)


@STAGE_REGISTRY.register("train")
class TrainStage(Stage):
    """``tools/train_net.py`` on a config, with optional initial weights from an earlier stage, the pseudo
    labels and centroid indexes of earlier stages added to training (``soft_labels``: those of them trained on
    their soft labels, DATASETS.TRAIN_PSEUDO_SOFT), a class-set change, and (``teacher``) an earlier stage's
    model as the burn-in teacher of online distillation."""

    REQUIRED = ("config",)
    OPTIONAL = ("opts", "init", "pseudo_labels", "soft_labels", "centroids", "class_transfer_from", "teacher")
    REFS = ("init", "pseudo_labels", "soft_labels", "centroids", "class_transfer_from", "teacher")

    @classmethod
    def check_options(cls, name, options, where):
        super().check_options(name, options, where)
        extra = [s for s in _as_list(options.get("soft_labels")) if s not in _as_list(options.get("pseudo_labels"))]
        if extra:
            raise RecipeError(f"{where}: stage {name!r}: soft_labels {extra} must also be in its pseudo_labels "
                              f"{_as_list(options.get('pseudo_labels'))}")
    DISTRIBUTED = True

    def _derived_opts(self):
        ctx, o = self.ctx, self.options
        opts = []
        if o.get("init"):
            opts += ["MODEL.WEIGHTS", ctx.result(o["init"], "weights")]
        pseudo = [(ctx.result(s, "dataset"), ctx.result(s, "dir")) for s in _as_list(o.get("pseudo_labels"))]
        if pseudo:
            opts += ["DATASETS.PSEUDO_LABEL_FOLDERS", repr([list(p) for p in pseudo])]
            opts += ["DATASETS.TRAIN_PSEUDO", repr(tuple(name for name, _ in pseudo))]
        soft = [ctx.result(s, "dataset") for s in _as_list(o.get("soft_labels"))]
        if soft:
            opts += ["DATASETS.TRAIN_PSEUDO_SOFT", repr(tuple(soft))]
        index = [(ctx.result(s, "dataset"), ctx.result(s, "index")) for s in _as_list(o.get("centroids"))]
        if index:
            opts += ["DATALOADER.CENTROID_SAMPLING.INDEX_FILES", repr([list(p) for p in index])]
        if o.get("class_transfer_from"):
            opts += ["MODEL.CLASS_TRANSFER.SOURCE_CLASSES", repr(list(ctx.result(o["class_transfer_from"], "classes")))]
        if o.get("teacher"):
            # Online distillation (SemiSupervisedTrainer): an earlier stage's model is the burn-in teacher.
            opts += ["SEMISUP.TEACHER.WEIGHTS", ctx.result(o["teacher"], "weights")]
        return opts

    def fingerprint(self):
        config = self.ctx.config_path(self.options["config"])
        opts = self.opts + self.ctx.opts
        fingerprint = {"config": config_delta(config, opts + self.ctx.recipe.data_opts(config, opts))}
        if self.options.get("soft_labels"):  # the same stages used otherwise: hard labels or soft
            fingerprint["soft_labels"] = _as_list(self.options["soft_labels"])
        return fingerprint

    def run(self, out_dir, resume):
        config = self.ctx.config_path(self.options["config"])
        cmd = [*command("train_net", self.ctx.python), "--config-file", config, *self.ctx.launch_args()]
        if resume:
            cmd.append("--resume")
        opts = self.opts + self.ctx.opts
        cmd += ["OUTPUT_DIR", out_dir] + self._derived_opts() + opts + self.ctx.recipe.data_opts(config, opts)
        _run(cmd, f"stage {self.spec.name!r} (train)")

    def result_problem(self, out_dir):
        return weights_file_problem(os.path.join(out_dir, "model_final.pth"))

    def collect(self, out_dir):
        config = os.path.join(out_dir, "config.yaml")
        weights = os.path.join(out_dir, "model_final.pth")
        return {
            "dir": out_dir,
            "config": config if os.path.isfile(config) else None,
            "weights": weights if os.path.isfile(weights) else None,
            "metrics": read_metrics(out_dir),
            "classes": _training_classes(config) if os.path.isfile(config) else None,
        }


def _training_classes(config_file):
    """Class names of the first training dataset of a config (stuff classes, else thing classes)."""
    from detectron2.data import MetadataCatalog

    from ...config import load_config
    from ...data.datasets import register_from_cfg

    cfg = load_config(config_file, [])
    register_from_cfg(cfg)
    if not cfg.DATASETS.TRAIN:
        return None
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    classes = meta.get("stuff_classes") or meta.get("thing_classes")
    return list(classes) if classes else None


@STAGE_REGISTRY.register("evaluate")
class EvaluateStage(Stage):
    """``tools/train_net.py --eval-only``: an earlier stage's model on the given datasets."""

    REQUIRED = ("model", "datasets")
    OPTIONAL = ("opts",)
    REFS = ("model",)
    DISTRIBUTED = True

    def fingerprint(self):
        return {"datasets": _as_list(self.options["datasets"]), "opts": self.opts + self.ctx.opts}

    def run(self, out_dir, resume):
        ctx, model = self.ctx, self.options["model"]
        cmd = [*command("train_net", ctx.python), "--eval-only", "--config-file", ctx.result(model, "config"),
               *ctx.launch_args(), "OUTPUT_DIR", out_dir, "MODEL.WEIGHTS", ctx.result(model, "weights"),
               "DATASETS.TEST", repr(tuple(_as_list(self.options["datasets"])))] + self.opts + ctx.opts
        _run(cmd, f"stage {self.spec.name!r} (evaluate)")

    def collect(self, out_dir):
        return {"dir": out_dir, "metrics": read_metrics(out_dir, "eval_metrics.json")}


@STAGE_REGISTRY.register("pseudo_labels")
class PseudoLabelStage(Stage):
    """``tools/generate_pseudo_labels.py``: an earlier stage's model labels a dataset or image folder. The
    result is registered for later stages as the dataset ``recipe_<stage name>``."""

    REQUIRED = ("model", "input")
    OPTIONAL = ("opts",)
    REFS = ("model",)
    DISTRIBUTED = True

    def _input(self):
        value = str(self.options["input"])
        return os.path.abspath(os.path.expanduser(value)) if os.path.sep in value else value

    def fingerprint(self):
        return {"input": self._input(), "opts": self.opts + self.ctx.opts}

    def run(self, out_dir, resume):
        ctx, model = self.ctx, self.options["model"]
        cmd = [*command("generate_pseudo_labels", ctx.python), "--config-file", ctx.result(model, "config"),
               "--input", self._input(), "--output", out_dir, *ctx.launch_args(),
               "MODEL.WEIGHTS", ctx.result(model, "weights")] + self.opts + ctx.opts
        _run(cmd, f"stage {self.spec.name!r} (pseudo labels)")

    def collect(self, out_dir):
        return {
            "dir": out_dir,
            "dataset": f"recipe_{self.spec.name}",
            "input": self._input(),
            "report": PseudoLabelFolder(out_dir).report(),
        }


@STAGE_REGISTRY.register("centroid_index")
class CentroidIndexStage(Stage):
    """The centroid index of an earlier pseudo-label stage's labels (``centroids.npz``)."""

    REQUIRED = ("labels",)
    OPTIONAL = ("min_area",)
    REFS = ("labels",)

    def _min_area(self):
        if "min_area" in self.options:
            return int(self.options["min_area"])
        from ...config import get_selftrain_cfg

        return int(get_selftrain_cfg().DATALOADER.CENTROID_SAMPLING.MIN_AREA)

    def fingerprint(self):
        return {"min_area": self._min_area()}

    def run(self, out_dir, resume):
        from ...data.centroids import build_centroid_index, save_centroid_index

        folder = PseudoLabelFolder(self.ctx.result(self.options["labels"], "dir"))
        meta = folder.meta() if folder.exists() else {}
        if "stuff_classes" not in meta:
            raise RecipeError(f"{folder.root} has no dataset.json / meta.json with stuff_classes: not semantic pseudo "
                              "labels")
        index = build_centroid_index(
            folder.records(), len(meta["stuff_classes"]), self._min_area(), ignore_label=meta.get("ignore_label", 255)
        )
        save_centroid_index(index, os.path.join(out_dir, "centroids.npz"))

    def collect(self, out_dir):
        return {
            "dir": out_dir,
            "index": os.path.join(out_dir, "centroids.npz"),
            "dataset": self.ctx.results[self.options["labels"]]["dataset"],
        }
