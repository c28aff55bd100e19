"""Entropy of a KD teacher's class distributions at each temperature (the analysis of "Towards Comparable
Knowledge Distillation in Semantic Image Segmentation"): how many pixels the teacher gives one class with
probability close to 1, and how a temperature tau > 1 spreads them.

    python tools/teacher_entropy.py --config-file configs/demo/kd-pspnet-student.yaml \
        DISTILL.TEACHER.WEIGHTS output/demo/pspnet-effnetlite0/model_final.pth
    python tools/teacher_entropy.py --config-file KD_CONFIG --taus 1 2 4 8 --dataset demo_city_val_sem_seg \
        --output entropy.json

The config is a KD config (``MODEL.META_ARCHITECTURE Distiller``): its teacher (``DISTILL.TEACHER.*``) runs in
eval mode on the images of ``--dataset`` (default: the config's ``DATASETS.TRAIN``, the images KD trains on)
with the test-time mapper, and the map pixel KD reads (the teacher side of the ``DISTILL.PIXEL_KD.TAP`` tap,
or ``--tap``) is scored per pixel. Prints a Markdown table; ``--output`` also writes it as JSON.
"""
import argparse
import logging
import sys

import torch

from selftrain_d2.cli import add_version_argument
from selftrain_d2.config import load_config
from selftrain_d2.data.build import build_test_loader
from selftrain_d2.data.datasets import register_from_cfg
from selftrain_d2.distill import FeatureTaps, build_teacher, parse_taps
from selftrain_d2.distill.entropy import TeacherEntropy, entropy_table
from selftrain_d2.utils.io import atomic_write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("--config-file", required=True, help="a KD config (MODEL.META_ARCHITECTURE Distiller)")
    parser.add_argument("--taus", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--dataset", nargs="+", default=None, help="registered datasets (default: DATASETS.TRAIN)")
    parser.add_argument("--tap", default=None, help="DISTILL.TAPS name to score (default: DISTILL.PIXEL_KD.TAP)")
    parser.add_argument("--max-images", type=int, default=0, help="stop after this many images (0: all)")
    parser.add_argument("--confident", type=float, default=0.99, help="top probability counted as near-certain")
    parser.add_argument("--bins", type=int, default=10, help="histogram bins of entropy / log C")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "Distiller":
        sys.exit(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; give a KD config "
                 "(Distiller), whose DISTILL.TEACHER.CONFIG / WEIGHTS name the teacher")
    if not cfg.DISTILL.TEACHER.WEIGHTS:
        sys.exit(f"{args.config_file}: DISTILL.TEACHER.WEIGHTS is empty: an untrained teacher's entropy means nothing")
    register_from_cfg(cfg)
    cfg.freeze()
    tap = args.tap or cfg.DISTILL.PIXEL_KD.TAP
    _, teacher_modules = parse_taps(cfg.DISTILL.TAPS, [tap])
    teacher, tcfg = build_teacher(cfg)
    taps = FeatureTaps(teacher, teacher_modules, "teacher")
    stats = TeacherEntropy(args.taus, bins=args.bins, confident=args.confident)
    datasets = args.dataset or list(cfg.DATASETS.TRAIN)
    images = 0
    with torch.no_grad():
        for name in datasets:
            loader = build_test_loader(tcfg, name)
            for batch in loader:
                if args.max_images and images >= args.max_images:
                    break
                with taps.capture() as maps:
                    teacher(batch)
                stats.update(maps[tap])
                images += len(batch)
    summary = stats.summary()
    print(f"Teacher {cfg.DISTILL.TEACHER.CONFIG} ({cfg.DISTILL.TEACHER.WEIGHTS}), tap {tap!r} "
          f"({teacher_modules[tap]}), {images} images of {', '.join(datasets)}, {stats.pixels} pixels:\n")
    print(entropy_table(summary, args.confident, stats.num_classes))
    if args.output:
        atomic_write_json(args.output, {"config": args.config_file, "teacher": cfg.DISTILL.TEACHER.WEIGHTS,
                                        "tap": tap, "datasets": datasets, "images": images,
                                        "pixels": stats.pixels, "num_classes": stats.num_classes,
                                        "confident": args.confident, "per_tau": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
