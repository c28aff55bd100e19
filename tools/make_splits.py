#!/usr/bin/env python
"""Write label-fraction split files for a registered dataset (see datasets/README.md).

Runs the command ``selftrain_d2.cli.make_splits`` (``--help`` says the rest).
"""
import sys

from selftrain_d2.cli.make_splits import main

if __name__ == "__main__":
    sys.exit(main())
