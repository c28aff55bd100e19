"""Hyperparameter sweeps with the KD paper's protocol; the sweep file's format and the outputs are described in
``selftrain_d2.orchestration.sweep``.

    python tools/sweep.py --config-file configs/demo/kd-sweep.yaml --output output/demo/kd-sweep
    python tools/sweep.py --config-file SWEEP_YAML --output DIR --storage postgresql://user@host/db  # shared
"""
import sys

from selftrain_d2.orchestration import sweep

__all__ = ["main"]


def main(argv=None):
    sweep.run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
