#!/usr/bin/env python
"""Hyperparameter sweeps with the protocol of the KD paper (tuned learning rate and weight decay, then KD).

Runs the command ``selftrain_d2.cli.sweep`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
