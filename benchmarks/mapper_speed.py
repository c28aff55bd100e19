#!/usr/bin/env python
"""Time the training mapper per image, with and without DATALOADER.DECODE_CACHE_MB, at each crop size.

    .venv/bin/python benchmarks/mapper_speed.py
    .venv/bin/python benchmarks/mapper_speed.py --config-file CFG --crops 64x128 128x256 --epochs 4 [KEY VALUE ...]

Maps the first dataset of DATASETS.TRAIN for --epochs passes, NumPy and ``random`` seeded per sample (the same
draws for both variants), with the cache off and at the config's capacity (or --cache-mb), in alternating
order over --rounds rounds. The first pass fills the cache and is left out: the figures are what every later
epoch costs. Each crop is given to the mapper as a crop-size schedule gives it (a record's ``crop_size``).
Prints a table (crop, cache MiB, ms per image, speed-up over no cache; the title gives the last cached round's
hits), or with --json one JSON list. Data loading runs in the training process here (NUM_WORKERS 0), so on the
demo this time adds to every training step. Never asserted by tests.
"""
import argparse
import os
import random
import statistics
import time

import numpy as np

from bench_utils import ROOT, print_table  # first: puts this checkout's package on sys.path
from detectron2.data import DatasetCatalog  # noqa: E402

from selftrain_d2.config import load_config  # noqa: E402
from selftrain_d2.data import build_mapper  # noqa: E402
from selftrain_d2.data.datasets import register_from_cfg  # noqa: E402


def time_epochs(mapper, records, epochs, crop):
    """Seconds per image of each epoch after the first (which fills a cache)."""
    per_epoch = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for i, record in enumerate(records):
            np.random.seed(epoch * len(records) + i)
            random.seed(epoch * len(records) + i)
            mapper(dict(record, crop_size=crop) if crop else record)
        per_epoch.append((time.perf_counter() - start) / len(records))
    return per_epoch[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file",
                        default=os.path.join(ROOT, "configs", "demo", "deeplabv3plus-effnetlite0.yaml"))
    parser.add_argument("--crops", nargs="+", default=["64x128", "128x256"], help="HxW; 'config' for INPUT.CROP")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the dataset, the first one untimed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-mb", type=int, default=None, help="default: the config's DECODE_CACHE_MB (or 64)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    cfg = load_config(args.config_file, args.opts)
    register_from_cfg(cfg)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    cache_mb = args.cache_mb if args.cache_mb is not None else (cfg.DATALOADER.DECODE_CACHE_MB or 64)
    if cache_mb <= 0:
        raise SystemExit(f"--cache-mb {cache_mb}: give a positive capacity to compare against no cache")
    crops = [None if c == "config" else tuple(int(v) for v in c.split("x")) for c in args.crops]
    variants = [(crop, mb) for crop in crops for mb in (0, cache_mb)]
    times = {v: [] for v in variants}
    hits = 0
    for r in range(args.rounds):
        for crop, mb in (variants if r % 2 == 0 else variants[::-1]):
            c = cfg.clone()
            c.DATALOADER.DECODE_CACHE_MB = mb
            mapper = build_mapper(c, is_train=True)  # a new mapper: an empty cache each round
            times[crop, mb] += time_epochs(mapper, records, args.epochs, crop)
            if mb:
                hits = mapper.cache.hits

    rows = []
    for crop, mb in variants:
        ms = 1000 * statistics.median(times[crop, mb])
        rows.append({"crop": "x".join(map(str, crop)) if crop else "config", "cache_mb": mb,
                     "ms_per_image": round(ms, 3), "speedup": round(1000 * statistics.median(times[crop, 0]) / ms, 2)})
    print_table(rows, f"{len(records)} images of {cfg.DATASETS.TRAIN[0]}, {args.epochs - 1} timed epochs x "
                      f"{args.rounds} rounds; a cached mapper's last round: {hits} hits",
                [("crop", "crop"), ("cache MiB", "cache_mb"), ("ms / image", "ms_per_image"),
                 ("speed-up", lambda r: f"{r['speedup']:.2f}x")], args.json)


if __name__ == "__main__":
    main()
