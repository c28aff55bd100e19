"""How orchestrators (recipes, sweeps) start the project's commands and resolve the paths their files name.

A command is a module of ``selftrain_d2.cli`` run as ``python -m``, in a child whose ``PYTHONPATH`` starts with
the folder this package was imported from, so parent and child run the same code whether the package is
installed, installed in editable mode, or taken from a checkout through ``PYTHONPATH``.
"""
import os
import sys

__all__ = ["command", "command_env", "resolve_path"]

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
