#!/usr/bin/env python
"""Label a registered dataset or an image folder with a trained teacher (offline pseudo labels).

    python tools/generate_pseudo_labels.py --config-file TEACHER_CFG --input demo_city_unlabeled_sem_seg \\
        --output output/pseudo MODEL.WEIGHTS output/teacher/model_final.pth
    python tools/generate_pseudo_labels.py --config-file CFG --input /data/frames --output DIR --num-gpus 2 \\
        MODEL.WEIGHTS W PSEUDO_LABELS.THRESHOLD 0.9 PSEUDO_LABELS.TTA.SCALES "[0.75, 1.0, 1.25]" \\
        PSEUDO_LABELS.TTA.FLIP True

A killed run continues where it stopped when started again with the same arguments; a finished one does
nothing. Register the output for training with ``DATASETS.PSEUDO_LABELS [["NAME", "DIR"]]``.
"""
import os
import sys

from selftrain_d2.engine import default_argument_parser, launch_from_args, setup
from selftrain_d2.engine.launch import LaunchError
from selftrain_d2.pseudo_labels import generate_pseudo_labels


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--input", required=True, help="registered dataset name or folder of images")
    parser.add_argument("--output", required=True, help="folder for the pseudo labels (resumed if it exists)")
    return parser.parse_args(argv)


def main(args):
    # Logs and the merged config go to the output folder, never into the teacher's OUTPUT_DIR.
    args.opts = list(args.opts) + ["OUTPUT_DIR", os.path.abspath(args.output)]
    cfg = setup(args)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: the teacher needs trained weights to make pseudo labels")
    # The teacher is built (its weights read safely) only when some image still needs labels.
    return generate_pseudo_labels(cfg, args.input, args.output, teacher_config=args.config_file)


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    if not args.config_file:
        sys.exit("--config-file (the teacher's config) is required")
    try:
        launch_from_args(main, args)
    except LaunchError as e:
        sys.exit(f"generate_pseudo_labels.py: error: {e}")
