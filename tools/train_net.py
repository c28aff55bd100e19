#!/usr/bin/env python
"""Train or evaluate any selftrain-d2 / Detectron2 model from a YAML config.

Runs the command ``selftrain_d2.cli.train_net`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.train_net import main

if __name__ == "__main__":
    sys.exit(main())
