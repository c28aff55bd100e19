"""The project's commands, one module each with a ``main(argv=None)`` that returns an exit status.

Run them as ``python -m selftrain_d2.cli.<name>``, through the scripts of the checkout's ``tools/`` folder, or
as the console scripts ``setup.py`` installs (``selftrain-train`` ...; ``COMMANDS`` lists them). Every command
takes ``--version``.
"""
import sys

from selftrain_d2.version import add_version_argument, version_string  # noqa: F401 (re-exported)

__all__ = ["COMMANDS", "add_version_argument", "launch_command", "version_string"]

# console script -> module of this package (setup.py reads this dict from this file's text)
COMMANDS = {
    "selftrain-train": "train_net",
    "selftrain-pseudo-labels": "generate_pseudo_labels",
    "selftrain-recipe": "run_recipe",
    "selftrain-sweep": "sweep",
    "selftrain-splits": "make_splits",
    "selftrain-metrics": "show_metrics",
    "selftrain-teacher-entropy": "teacher_entropy",
}


def launch_command(name, run, args):
    """``run(args)`` in every process of the launch ``args`` asks for (``--num-gpus``, ``--num-machines`` ...);
    a launch that cannot work exits with its reason. Returns the exit status 0."""
    from selftrain_d2.engine import launch_from_args
    from selftrain_d2.engine.launch import LaunchError

    print("Command Line Args:", args)
    try:
        launch_from_args(run, args)
    except LaunchError as e:
        sys.exit(f"{name}: error: {e}")
    return 0
