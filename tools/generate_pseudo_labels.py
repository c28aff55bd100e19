#!/usr/bin/env python
"""Label a registered dataset or an image folder with a trained teacher (offline pseudo labels).

Runs the command ``selftrain_d2.cli.generate_pseudo_labels`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.generate_pseudo_labels import main

if __name__ == "__main__":
    sys.exit(main())
