#!/usr/bin/env python
"""Print the evaluation results a training run saved (OUTPUT_DIR/final_metrics.json).

Runs the command ``selftrain_d2.cli.show_metrics`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.show_metrics import main

if __name__ == "__main__":
    sys.exit(main())
