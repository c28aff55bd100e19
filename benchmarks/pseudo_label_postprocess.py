#!/usr/bin/env python
"""Post-processing of one Cityscapes-size prediction (19 x 1024 x 2048 class probabilities) into pseudo labels,
today's code against the baseline (benchmarks/pseudo_label_baseline.py: host numpy, before issue 26).

    .venv/bin/python benchmarks/pseudo_label_postprocess.py
    .venv/bin/python benchmarks/pseudo_label_postprocess.py --repeats 5 --threads 1 --device cpu

- ``hard``: hard label (threshold 0.9) + confidence map, up to the uint8 arrays the PNGs hold. Baseline: the
  probabilities copied to numpy, ``hard_label_from_probs`` (argmax, max, threshold) and the quantisation
  ``write_confidence`` did; now: ``semantic_label_arrays`` on the probabilities' device.
- ``soft``: top-3 soft labels written as .npz (to a temporary folder, tmpfs where there is one). Baseline:
  ``write_soft_label`` (``np.argsort`` and ``np.savez_compressed``); now: ``semantic_label_arrays(top_k=3)``
  (device) + ``write_top_k`` (deflate level 1), also shown apart: ``soft device`` is what the labelling loop
  waits for, ``soft write`` what the writer thread does beside it.

The probabilities are realistic rather than random (random ones neither compress nor have confident
regions): logits at 1/4 resolution with one class per region and noise, bilinearly upsampled, softmax. Runs
alternate baseline / now in one process; the table gives medians of CPU time (this process, all threads) and
of wall time, and the ratios. Before the timings, the outputs are checked: hard-label and confidence PNGs
byte-identical, soft labels' indices and probabilities equal. Never asserted by tests.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from pseudo_label_baseline import BASELINE_COMMIT, load_baseline  # noqa: E402

import bench_utils  # noqa: E402,F401  (first: puts this checkout's package on sys.path)
from selftrain_d2.pseudo_labels import storage  # noqa: E402

THRESHOLD = 0.9
TOP_K = 3


def realistic_probabilities(num_classes=19, height=1024, width=2048, regions=80, seed=0):
    """float32 [C, H, W]: softmax of low-resolution region logits (one class per Voronoi cell, margin 6,
    noise 1.5) upsampled 4x, as a segmentation head's output looks."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // 4, width // 4
    centres = torch.rand(regions, 2, generator=g) * torch.tensor([h, w])
    classes = torch.randint(0, num_classes, (regions,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cell = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2).argmin(0)
    logits = torch.randn(num_classes, h, w, generator=g) * 1.5
    logits.scatter_add_(0, classes[cell][None], torch.full((1, h, w), 6.0))
    return F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0].softmax(0)


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="folder for the soft-label files (default: tmpfs, so that the disk does not count)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = load_baseline().storage
    probs = realistic_probabilities().to(args.device)
    tmp = tempfile.mkdtemp(dir=args.tmp, prefix="pl_postprocess_")

    def hard_before():
        label, confidence = old.hard_label_from_probs(probs.cpu().numpy(), THRESHOLD, 255)
        return label, np.rint(np.clip(confidence, 0.0, 1.0) * 255).astype(np.uint8)  # as write_confidence did

    def hard_now():
        arrays = storage.semantic_label_arrays(probs, THRESHOLD, 255, confidence=True)
        return arrays["label"], arrays["confidence"]

    def soft_before():
        old.write_soft_label(os.path.join(tmp, "before.npz"), probs.cpu().numpy(), TOP_K)

    def soft_device():
        return storage.semantic_label_arrays(probs, 0.0, 255, top_k=TOP_K)

    def soft_write(arrays):
        storage.write_top_k(os.path.join(tmp, "now.npz"), arrays["soft_indices"], arrays["soft_probs"],
                            probs.shape[0])

    # Same files first.
    (label_a, conf_a), (label_b, conf_b) = hard_before(), hard_now()
    old.write_hard_label(os.path.join(tmp, "a.png"), label_a)
    old.write_confidence(os.path.join(tmp, "a_conf.png"), old.hard_label_from_probs(probs.cpu().numpy())[1])
    storage.write_hard_label(os.path.join(tmp, "b.png"), label_b)
    storage.write_confidence(os.path.join(tmp, "b_conf.png"), conf_b)
    same = {}
    for name, (a, b) in {"hard label PNG": ("a.png", "b.png"), "confidence PNG": ("a_conf.png", "b_conf.png")}.items():
        with open(os.path.join(tmp, a), "rb") as fa, open(os.path.join(tmp, b), "rb") as fb:
            same[name] = fa.read() == fb.read()
    soft_before()
    soft_write(soft_device())
    before, now = (storage.read_soft_label(os.path.join(tmp, f)) for f in ("before.npz", "now.npz"))
    same["soft indices"] = np.array_equal(before["indices"], now["indices"])
    same["soft probs"] = np.array_equal(before["probs"], now["probs"])
    sizes = {f: os.path.getsize(os.path.join(tmp, f)) / 2 ** 20 for f in ("before.npz", "now.npz")}

    times = {name: [] for name in ("hard before", "hard now", "soft before", "soft now", "soft device",
                                   "soft write")}
    for _ in range(args.repeats):
        times["hard before"].append(_timed(hard_before))
        times["hard now"].append(_timed(hard_now))
        times["soft before"].append(_timed(soft_before))
        holder = {}
        device_t = _timed(lambda: holder.update(arrays=soft_device()))
        write_t = _timed(lambda: soft_write(holder["arrays"]))
        times["soft device"].append(device_t)
        times["soft write"].append(write_t)
        times["soft now"].append((device_t[0] + write_t[0], device_t[1] + write_t[1]))
    med = {name: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for name, v in times.items()}

    print(f"19 x 1024 x 2048 probabilities on {args.device}, {args.threads} threads, {args.repeats} runs each, "
          f"baseline {BASELINE_COMMIT} (loadavg {os.getloadavg()[0]:.1f})")
    print("| step | CPU ms | wall ms | baseline / now (CPU) | baseline / now (wall) |")
    print("|---|---|---|---|---|")
    rows = [("hard before", None), ("hard now", "hard before"), ("soft before", None), ("soft now", "soft before"),
            ("soft device", "soft before"), ("soft write", None)]
    for name, base in rows:
        cpu, wall = med[name]
        ratio = (f"{med[base][0] / cpu:.1f}x | {med[base][1] / wall:.1f}x" if base else " | ")
        print(f"| {name} | {cpu * 1000:.0f} | {wall * 1000:.0f} | {ratio} |")
    print("same output: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())
          + f"; soft file {sizes['before.npz']:.1f} MiB before, {sizes['now.npz']:.1f} MiB now")
    for f in os.listdir(tmp):
        os.unlink(os.path.join(tmp, f))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
