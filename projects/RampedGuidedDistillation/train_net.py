#!/usr/bin/env python
"""tools/train_net.py with this project's components registered:

    python projects/RampedGuidedDistillation/train_net.py \
        --config-file projects/RampedGuidedDistillation/configs/ramped-gd-demo.yaml \
        SEMISUP.TEACHER.WEIGHTS output/demo/mask2former-instance/model_final.pth
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))

import ramped_gd  # noqa: E402,F401  (registers the filter, the hook's trainer)
from train_net import main  # noqa: E402

from selftrain_d2.engine import default_argument_parser, launch_from_args  # noqa: E402

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_from_args(main, args)
