"""Label a registered dataset or an image folder with a trained teacher (offline pseudo labels).

    python tools/generate_pseudo_labels.py --config-file TEACHER_CFG --input demo_city_unlabeled_sem_seg \\
        --output output/pseudo MODEL.WEIGHTS output/teacher/model_final.pth
    python tools/generate_pseudo_labels.py --config-file CFG --input /data/frames --output DIR --num-gpus 2 \\
        MODEL.WEIGHTS W OFFLINE_PSEUDO_LABELS.THRESHOLD 0.9 OFFLINE_PSEUDO_LABELS.TTA.SCALES "[0.75, 1.0, 1.25]" \\
        OFFLINE_PSEUDO_LABELS.TTA.FLIP True

A killed run continues where it stopped when started again with the same arguments; a finished one does
nothing. Register the output for training with ``DATASETS.PSEUDO_LABEL_FOLDERS [["NAME", "DIR"]]``.
"""
import os
import sys

from selftrain_d2.cli import add_version_argument, launch_command
from selftrain_d2.engine import default_argument_parser, setup
from selftrain_d2.pseudo_labels import generate_pseudo_labels


def parse_args(argv=None):
    parser = add_version_argument(default_argument_parser())
    parser.add_argument("--input", required=True, help="registered dataset name or folder of images")
    parser.add_argument("--output", required=True, help="folder for the pseudo labels (resumed if it exists)")
    return parser.parse_args(argv)


def run(args):
    """One process's share of the labelling; what ``launch`` starts in each process."""
    # Logs and the merged config go to the output folder, never into the teacher's OUTPUT_DIR.
    args.opts = list(args.opts) + ["OUTPUT_DIR", os.path.abspath(args.output)]
    cfg = setup(args)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: the teacher needs trained weights to make pseudo labels")
    # The teacher is built (its weights read safely) only when some image still needs labels.
    return generate_pseudo_labels(cfg, args.input, args.output, teacher_config=args.config_file)


def main(argv=None):
    args = parse_args(argv)
    if not args.config_file:
        sys.exit("--config-file (the teacher's config) is required")
    return launch_command("generate_pseudo_labels", run, args)


if __name__ == "__main__":
    sys.exit(main())
