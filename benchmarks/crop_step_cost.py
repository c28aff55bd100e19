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
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from selftrain_d2.config import load_config  # noqa: E402
from selftrain_d2.data.crop_schedules import EpochTable  # noqa: E402
from selftrain_d2.engine import Trainer  # noqa: E402
from selftrain_d2.modeling import build_model  # noqa: E402
from selftrain_d2.utils.onednn import set_primitive_cache_capacity  # noqa: E402


def schedule_shapes(cfg):
    """The distinct (crop, batch) pairs of INPUT.CROP_SCHEDULE's scales, smallest crop first: one
    coarse2fine+ cycle of the trainer's own EpochTable, one epoch per scale."""
    cs = cfg.INPUT.CROP_SCHEDULE
    table = EpochTable(schedule="coarse2fine+", scales=cs.SCALES, full_crop=tuple(cfg.INPUT.CROP.SIZE),
                       full_batch=cfg.SOLVER.IMS_PER_BATCH, max_batch=cs.MAX_BATCH, epoch_size=1,
                       num_epochs=len(cs.SCALES), size_divisibility=cs.SIZE_DIVISIBILITY)
    return list(dict.fromkeys((e.crop, e.batch) for e in table.entries))


def random_batch(crop, batch, num_classes, generator):
    return [{"image": torch.randint(0, 256, (3, *crop), dtype=torch.uint8, generator=generator),
             "sem_seg": torch.randint(0, num_classes, crop, generator=generator)} for _ in range(batch)]


def parse_args(description, steps):
    """The arguments of the benchmarks that time a schedule's shapes (this one and dilated_conv.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file",
                        default=os.path.join(ROOT, "configs", "demo", "deeplabv3plus-effnetlite0.yaml"))
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per shape (and variant) and round")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args()


def schedule_config(args):
    """``--config-file`` with the global-pool head (as benchmarks/fast_schedules.py trains it), no weights file,
    the schedule's scales and batch cap, and the KEY VALUE overrides."""
    return load_config(args.config_file, [
        "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusGlobalPoolHead", "MODEL.WEIGHTS", "",
        "INPUT.CROP_SCHEDULE.SCALES", repr(args.scales), "INPUT.CROP_SCHEDULE.MAX_BATCH", str(args.max_batch),
        *args.opts])


def print_table(rows, title, columns, as_json):
    """``rows`` as one JSON list, or a title line and a table of ``columns``: (header, row key or row -> text)."""
    if as_json:
        print(json.dumps(rows))
        return
    cells = [(h, f if callable(f) else (lambda r, k=f: str(r[k]))) for h, f in columns]
    print(title)
    print("| " + " | ".join(h for h, _ in cells) + " |")
    print("|" + "---|" * len(cells))
    for row in rows:
        print("| " + " | ".join(f(row) for _, f in cells) + " |")


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
