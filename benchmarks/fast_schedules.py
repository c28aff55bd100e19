#!/usr/bin/env python
"""Fast crop-size schedules against the constant crop, for the same number of training images
(self-training paper, Table 4).

    .venv/bin/python benchmarks/fast_schedules.py --output output/bench/fast_schedules
    .venv/bin/python benchmarks/fast_schedules.py --schedules constant coarse2fine+ --warmup 0 10 --seeds 1 2 3 --json
    .venv/bin/python benchmarks/fast_schedules.py --jobs 2 ...   # two runs at a time, one core each

Each row trains the demo DeepLabV3+ (``--config-file``; its head is switched to the global-pool ASPP so any
crop works) with INPUT.CROP_SCHEDULE on: the constant schedule and each fast schedule with and without a
crop-size warm-up of W epochs. Every run processes the images SOLVER.MAX_ITER x IMS_PER_BATCH make. Runs go
through tools/train_net.py in subprocesses, each in a folder named by schedule, warm-up, seed and a hash of
the other settings (config, KEY VALUE options, scales); a finished run (final_metrics.json present) is not
redone, so a killed benchmark resumes and a variant never reuses another's runs. Prints a table (schedule,
warm-up, training seconds, images/s, speed-up over constant, mIoU mean +- std over seeds), or with --json one
JSON list, one object per row with keys schedule, warmup, wall_s, images_per_s, speedup, mIoU (and mIoU_std,
seeds, iterations).

Runs go seed by seed, every other seed in reverse order (A B, B A, ...), so that a drift of the machine's
speed does not always fall on the same schedule. With --jobs N, N runs go at a time, each pinned to its own
1/N of the cores (CPU affinity and OMP_NUM_THREADS), so that the schedules share one machine state; but with
fewer threads per run, small-crop steps lose some of their parallel advantage, so it is a different setting.
Never run two benchmarks (or any two torch jobs with default threads) at once: OpenMP threads that outnumber
the cores busy-wait and slow each other several-fold.

wall_s is Detectron2's "Total training time" of the run (training only: model building and the final
evaluation, equal for all schedules, are left out), averaged over seeds. Never asserted by tests.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ["constant", "coarse2fine", "fine2coarse", "coarse2fine+", "fine2coarse+"]


def _seconds(text):
    h, m, s = (int(v) for v in text.split(":"))
    return 3600 * h + 60 * m + s


def _training_seconds(log_file):
    """Detectron2's 'Total training time' (h:mm:ss) and 'Overall training speed' (s/it, iterations)."""
    total = iters = None
    with open(log_file) as f:
        for line in f:
            m = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", line)
            if m:
                iters, per_it = int(m.group(1)), float(m.group(2))
                total = iters * per_it
            m = re.search(r"Total training time: (\d+:\d\d:\d\d)", line)
            if m and total is None:
                total = _seconds(m.group(1))
    return total, iters


def run_name(args, schedule, warmup, seed):
    """A run's folder name, with a hash of every setting that changes the run (the constant schedule ignores
    the scales and the batch cap, so its runs are shared across those)."""
    name = f"{schedule}-w{warmup}-s{seed}"
    settings = [os.path.abspath(args.config_file), *args.opts]
    if schedule != "constant":
        settings += [*map(str, args.scales), args.max_batch]
    return f"{name}-{hashlib.sha256(repr(settings).encode()).hexdigest()[:8]}"


def core_slots(jobs, cores=None):
    """Split the usable cores into ``jobs`` disjoint sets, one per concurrent run (None: no pinning)."""
    if jobs <= 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if len(cores) < jobs:
        raise SystemExit(f"--jobs {jobs} needs at least {jobs} usable cores, this process has {len(cores)}")
    per = len(cores) // jobs
    return [cores[i * per:(i + 1) * per] for i in range(jobs)]


def run_one(args, schedule, warmup, seed, slots):
    name = run_name(args, schedule, warmup, seed)
    out = os.path.join(args.output, name)
    metrics = os.path.join(out, "final_metrics.json")
    if not os.path.isfile(metrics):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", args.config_file,
               "OUTPUT_DIR", out, "SEED", str(seed),
               "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusGlobalPoolHead",
               "INPUT.CROP_SCHEDULE.ENABLED", "True", "INPUT.CROP_SCHEDULE.NAME", schedule,
               "INPUT.CROP_SCHEDULE.WARMUP_EPOCHS", str(warmup),
               "INPUT.CROP_SCHEDULE.SCALES", repr(args.scales),
               "INPUT.CROP_SCHEDULE.MAX_BATCH", str(args.max_batch), *args.opts]
        cores = slots.get()
        env = dict(os.environ)
        if cores is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(len(cores))
        start = time.perf_counter()
        try:
            with open(os.path.join(args.output, f"{name}.log"), "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
        finally:
            slots.put(cores)
        if code:
            raise SystemExit(f"run {out} failed (exit {code}); see {log.name}")
        print(f"# {schedule} warm-up {warmup} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    with open(metrics) as f:
        miou = json.load(f)["sem_seg"]["mIoU"]
    seconds, iters = _training_seconds(os.path.join(out, "log.txt"))
    return {"mIoU": miou, "wall_s": seconds, "iterations": iters}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(ROOT, "configs", "demo", "deeplabv3plus-effnetlite0.yaml"))
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "bench", "fast_schedules"))
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    parser.add_argument("--warmup", nargs="+", type=int, default=[0, 10], help="warm-up epochs to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each pinned to its share of the cores with as many threads")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)

    schedules = list(dict.fromkeys(["constant"] + args.schedules))
    variants = [(s, w) for s in schedules for w in ([0] if s == "constant" else args.warmup)]
    # Seed-major order, so that with --jobs > 1 every schedule runs beside the others, not beside itself;
    # every other seed in reverse (A B, B A, ...), so that a machine slowing down over the runs does not
    # always fall on the same schedule.
    order = [(s, w, seed) for i, seed in enumerate(args.seeds) for s, w in (variants[::-1] if i % 2 else variants)]
    slots = queue.Queue()
    for cores in core_slots(args.jobs):
        slots.put(cores)
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {key: pool.submit(run_one, args, *key, slots) for key in order}
        results = {key: f.result() for key, f in futures.items()}
    rows = []
    for schedule, warmup in variants:
        runs = [results[(schedule, warmup, seed)] for seed in args.seeds]
        mious = [r["mIoU"] for r in runs]
        rows.append({
            "schedule": schedule, "warmup": warmup, "seeds": args.seeds,
            "wall_s": statistics.mean(r["wall_s"] for r in runs),
            "iterations": runs[0]["iterations"],
            "mIoU": statistics.mean(mious),
            "mIoU_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
            "mIoU_runs": mious,
            "wall_s_runs": [r["wall_s"] for r in runs],
        })
    from selftrain_d2.config import load_config

    cfg = load_config(args.config_file, list(args.opts))
    images = cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH
    constant = rows[0]["wall_s"]
    for row in rows:
        row["images_per_s"] = images / row["wall_s"]
        row["speedup"] = constant / row["wall_s"]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{images} training images per run, seeds {args.seeds}, loadavg {os.getloadavg()[0]:.2f}")
    print("| schedule | warm-up (epochs) | iterations | training s | images/s | speed-up | mIoU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['warmup']} | {r['iterations']} | {r['wall_s']:.0f} | {r['images_per_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['mIoU']:.2f} +- {r['mIoU_std']:.2f} |")
    if len(args.seeds) > 1:
        print("\nPer seed, training s / mIoU (speed-up over the same seed's constant run):")
        print("| seed | " + " | ".join(f"{r['schedule']} w{r['warmup']}" for r in rows) + " |")
        print("|---" * (len(rows) + 1) + "|")
        for i, seed in enumerate(args.seeds):
            cells = [f"{r['wall_s_runs'][i]:.0f} / {r['mIoU_runs'][i]:.2f}"
                     + (f" ({rows[0]['wall_s_runs'][i] / r['wall_s_runs'][i]:.2f}x)" if r is not rows[0] else "")
                     for r in rows]
            print(f"| {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
