#!/usr/bin/env python
"""Time the hot paths of supervised training for a config: the mapper and the train step.

    .venv/bin/python benchmarks/train_step.py --config-file configs/demo/deeplabv3plus-effnetlite0.yaml
    .venv/bin/python benchmarks/train_step.py --config-file CFG --iters 20 --profile   # + torch profiler table

Prints one JSON line: mapper_ms_per_image, train_step_s (forward + backward + optimizer step on one
batch of SOLVER.IMS_PER_BATCH), and images_per_s. Never asserted by tests.
"""
import argparse
import json
import time

import torch

import bench_utils  # noqa: E402,F401  (first: puts this checkout's package on sys.path)
from detectron2.data import DatasetCatalog  # noqa: E402

from selftrain_d2.config import load_config  # noqa: E402
from selftrain_d2.data import build_mapper  # noqa: E402
from selftrain_d2.engine import Trainer  # noqa: E402
from selftrain_d2.modeling import build_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = load_config(args.config_file, args.opts)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    mapper = build_mapper(cfg, is_train=True)
    n = min(len(dicts), 50)
    start = time.perf_counter()
    samples = [mapper(dicts[i % len(dicts)]) for i in range(n)]
    mapper_ms = (time.perf_counter() - start) * 1000 / n

    model = build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    batch_size = cfg.SOLVER.IMS_PER_BATCH
    batches = [[samples[(i * batch_size + j) % n] for j in range(batch_size)] for i in range(args.iters + args.warmup)]

    def step(batch):
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for b in batches[: args.warmup]:
        step(b)
    start = time.perf_counter()
    for b in batches[args.warmup:]:
        step(b)
    step_s = (time.perf_counter() - start) / args.iters
    print(json.dumps({
        "config": args.config_file, "batch": batch_size, "threads": torch.get_num_threads(),
        "mapper_ms_per_image": round(mapper_ms, 2), "train_step_s": round(step_s, 4),
        "images_per_s": round(batch_size / step_s, 2),
    }))
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for b in batches[args.warmup: args.warmup + 3]:
                step(b)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
