#!/usr/bin/env python
"""Write train-id label maps for the registered kitti datasets:
KITTI semantic label ids (Cityscapes) -> the 19 Cityscapes train ids, others -> 255.

    python datasets/prepare_kitti.py [--root DATASETS_ROOT] [--output PREPARED_ROOT] [--overwrite]

Reads $ROOT/data_semantics/training/semantic/*.png
(ROOT: --root, default $DETECTRON2_DATASETS or ./datasets) and writes PREPARED_ROOT/...
(default $SELFTRAIN_PREPARED_ROOT, else ROOT/selftrain_d2_prepared), where the registered datasets look.
The dataset folder itself is only read. Each file is written atomically and files
already there are skipped, so an interrupted run can simply be started again.
"""
import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    p.add_argument(
        "--output", help="prepared root (default: $SELFTRAIN_PREPARED_ROOT, else ROOT/selftrain_d2_prepared)"
    )
    p.add_argument("--overwrite", action="store_true", help="rewrite files that exist already")
    args = p.parse_args(argv)
    from selftrain_d2.data.datasets.kitti import prepare

    try:
        prepare(root=args.root, output=args.output, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:  # missing folder, unknown ids: the message names the file
        sys.exit(f"prepare_kitti: {e}")


if __name__ == "__main__":
    main()
