#!/usr/bin/env python
"""Host reads in one training step (forward with the loss, backward) of a model on random data.

    .venv/bin/python benchmarks/host_syncs.py
    .venv/bin/python benchmarks/host_syncs.py --config-file CFG --size 256 --batch 2 [KEY VALUE ...]

Counts the calls of ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy`` and ``bool(tensor)``: on a GPU each
one waits for the queued work. Prints the total, the count per kind and the places (file:line) that make
them. Defaults: the COCO R50 Mask2Former config, 2 random 256x256 images with 8 instances each
(benchmarks/model_speed.py's batch), 10 decoder layers as configured. Never asserted by tests (a test in
tests/modeling/test_meta_device.py holds the budget).
"""
import argparse
import collections
import os
import traceback

import torch

from bench_utils import ROOT, benchmark_config, training_batch  # first: puts this checkout's package on sys.path

READS = ("item", "tolist", "cpu", "numpy", "__bool__")


def count_host_reads(fn):
    """(Counter of read kinds, Counter of (kind, file:line)) while ``fn()`` runs."""
    kinds, places = collections.Counter(), collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name):
        def wrapper(self, *args, **kwargs):
            kinds[name] += 1
            frame = traceback.extract_stack(limit=3)[-2]
            places[(name, f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}")] += 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    try:
        for name in READS:
            setattr(torch.Tensor, name, counted(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return kinds, places


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(
        ROOT, "configs", "coco", "instance-segmentation", "maskformer2_R50_bs16_50ep.yaml"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    from selftrain_d2.modeling import build_model

    cfg = benchmark_config(args.config_file, args.size, args.opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    data = training_batch(cfg, args.size, args.batch, 8, torch.Generator().manual_seed(0))
    kinds, places = count_host_reads(lambda: sum(model(data).values()).backward())
    print(f"{os.path.relpath(args.config_file, ROOT)}, {args.batch} x {args.size}x{args.size}: "
          f"{sum(kinds.values())} host reads per training step {dict(kinds)}")
    for (name, place), n in places.most_common():
        print(f"  {n:4d}  {name:9s} {place}")


if __name__ == "__main__":
    main()
