"""How orchestrators (recipes, sweeps) start the project's commands and resolve the paths their files name.

A command is a module of ``selftrain_d2.cli`` run as ``python -m``, in a child whose ``PYTHONPATH`` starts with
the folder this package was imported from, so parent and child run the same code whether the package is
installed, installed in editable mode, or taken from a checkout through ``PYTHONPATH``.
"""
import json
import os
import sys

__all__ = ["FINAL_METRICS", "command", "command_env", "metric_value", "read_metrics", "resolve_path"]

# What a train_net run writes into its OUTPUT_DIR after the final evaluation (engine.trainer.write_results).
FINAL_METRICS = "final_metrics.json"

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(name, python=None):
    """The argv prefix that runs command ``name`` (a module of ``selftrain_d2.cli``, e.g. ``"train_net"``)."""
    return [python or sys.executable, "-m", f"selftrain_d2.cli.{name}"]


def command_env(env=None):
    """``env`` (default: this process's environment) with this package's folder first on ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != _PACKAGE_PARENT]
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT, *paths])
    return env


def resolve_path(path, relative_to=None):
    """A path named in a recipe or sweep file: relative to the folder of ``relative_to`` (that file) where it
    exists there, else to the current folder; ``~`` expanded; always absolute."""
    path = os.path.expanduser(str(path))
    if relative_to and not os.path.isabs(path):
        candidate = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(path)


def read_metrics(folder, name=FINAL_METRICS):
    """The evaluation results a command wrote into ``folder`` (``{"sem_seg": {"mIoU": ..}, ..}``), or None when
    the file is missing or cut short."""
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def metric_value(metrics, path):
    """The number at ``path`` ("sem_seg/mIoU") of ``metrics``; a KeyError names the path and the keys there."""
    value = metrics
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"metric {path!r} not in the results (keys: {sorted(metrics or {})})")
        value = value[part]
    return float(value)
