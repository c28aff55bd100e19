#!/usr/bin/env python
"""Entropy of a KD teacher's class distributions at each temperature (the analysis of "Towards Comparable

Runs the command ``selftrain_d2.cli.teacher_entropy`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.teacher_entropy import main

if __name__ == "__main__":
    sys.exit(main())
