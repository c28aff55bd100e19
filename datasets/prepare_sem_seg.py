#!/usr/bin/env python
"""Write train-id label maps for a registered dataset whose published labels are not train ids:

    python datasets/prepare_sem_seg.py camvid            # CamVid (SegNet 11-class release): void 11 -> 255
    python datasets/prepare_sem_seg.py kitti             # KITTI semantic: Cityscapes label ids -> 19 train ids
    python datasets/prepare_sem_seg.py mapillary_vistas  # Mapillary Vistas v1.2: unlabeled 65 -> 255
    python datasets/prepare_sem_seg.py NAME [--root DATASETS_ROOT] [--output PREPARED_ROOT] [--overwrite]

Reads the dataset under ROOT (--root, default $DETECTRON2_DATASETS or ./datasets) and writes the converted
label maps under PREPARED_ROOT (default $SELFTRAIN_PREPARED_ROOT, else ROOT/selftrain_d2_prepared), where the
registered datasets look. The dataset folder itself is only read. Each file is written atomically and files
already there are skipped, so an interrupted run can simply be started again.
"""
import argparse
import importlib
import sys

DATASETS = ("camvid", "kitti", "mapillary_vistas")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--root", help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    p.add_argument(
        "--output", help="prepared root (default: $SELFTRAIN_PREPARED_ROOT, else ROOT/selftrain_d2_prepared)"
    )
    p.add_argument("--overwrite", action="store_true", help="rewrite files that exist already")
    args = p.parse_args(argv)
    prepare = importlib.import_module(f"selftrain_d2.data.datasets.{args.dataset}").prepare
    try:
        prepare(root=args.root, output=args.output, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as e:  # missing folder, unknown ids: the message names the file
        sys.exit(f"prepare_sem_seg {args.dataset}: {e}")


if __name__ == "__main__":
    main()
