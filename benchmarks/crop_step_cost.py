#!/usr/bin/env python
"""Cost of a training step at each (crop, batch) of a crop-size schedule, per pixel, against the full crop.

    .venv/bin/python benchmarks/crop_step_cost.py
    .venv/bin/python benchmarks/crop_step_cost.py --config-file CFG --scales 0.5 0.75 1.0 --rounds 6 [KEY VALUE ...]

A fast schedule saves what its pixels save only if a small-crop step costs no more per pixel than a
full-crop step (the batch grows as the crop shrinks, so every step holds about the same pixels). This
measures that directly: it builds the model of ``--config-file`` (with the global-pool ASPP head, as
benchmarks/fast_schedules.py does) and the trainer's optimizer, derives the (crop, batch) pairs from the
scales as INPUT.CROP_SCHEDULE does (the trainer's EpochTable), and times forward + backward +
optimizer steps on random images and labels of each shape. Shapes take turns, in alternating order over
--rounds rounds of --steps steps, so a drift in machine speed spreads over all of them.

Prints a table (crop, batch, pixels per batch, median and fastest step in ms, seconds per megapixel,
cost per pixel relative to the largest crop), or with --json one JSON list, one object per shape. Data
loading is left out: the mapper's cost is per image, the same total for every schedule. Never asserted by
tests.
"""
import os
import statistics
import time

import torch
from bench_utils import parse_args, print_table, random_batch, schedule_config, schedule_shapes

from selftrain_d2.engine import Trainer  # noqa: E402
from selftrain_d2.modeling import build_model  # noqa: E402
from selftrain_d2.utils.onednn import set_primitive_cache_capacity  # noqa: E402


def main():
    args = parse_args(__doc__, steps=3)
    cfg = schedule_config(args)
    set_primitive_cache_capacity(cfg.ONEDNN_PRIMITIVE_CACHE_CAPACITY)  # as the tools do: every shape's kernels kept
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    shapes = schedule_shapes(cfg)
    batches = {s: random_batch(*s, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, generator) for s in shapes}

    def step(batch):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for s in shapes:  # first steps at a new shape pay for allocation and kernel set-up
        step(batches[s])
        step(batches[s])
    times = {s: [] for s in shapes}
    for r in range(args.rounds):
        for s in (shapes if r % 2 == 0 else shapes[::-1]):
            for _ in range(args.steps):
                start = time.perf_counter()
                step(batches[s])
                times[s].append(time.perf_counter() - start)

    rows = []
    for (crop, batch), seconds in times.items():
        pixels = crop[0] * crop[1] * batch
        median = statistics.median(seconds)
        rows.append({"crop": list(crop), "batch": batch, "pixels": pixels, "step_ms": round(1000 * median, 1),
                     "step_min_ms": round(1000 * min(seconds), 1),
                     "s_per_mpx": round(median / pixels * 1e6, 4)})
    for row in rows:  # against the largest crop (the full one with the default scales)
        row["relative"] = round(row["s_per_mpx"] / rows[-1]["s_per_mpx"], 3)
    print_table(rows, f"{args.rounds} rounds x {args.steps} steps per shape, {torch.get_num_threads()} threads, "
                      f"loadavg {os.getloadavg()[0]:.2f}",
                [("crop", lambda r: f"{r['crop'][0]}x{r['crop'][1]}"), ("batch", "batch"), ("pixels", "pixels"),
                 ("step ms (median)", "step_ms"), ("fastest", "step_min_ms"), ("s / Mpx", "s_per_mpx"),
                 ("per pixel vs full crop", lambda r: f"{r['relative']:.3f}")], args.json)


if __name__ == "__main__":
    main()
