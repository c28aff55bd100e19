#!/usr/bin/env python
"""Run a whole recipe (teacher -> pseudo labels -> centroid index -> student -> evaluation) in one command.

Runs the command ``selftrain_d2.cli.run_recipe`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.run_recipe import main

if __name__ == "__main__":
    sys.exit(main())
