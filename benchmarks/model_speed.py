#!/usr/bin/env python
"""Speed of a model on random data, and how close it comes to this machine's matmul peak.

    .venv/bin/python benchmarks/model_speed.py --config-file CFG --size 384 --batch 2 [KEY VALUE ...]
    .venv/bin/python benchmarks/model_speed.py --config-file CFG --profile   # + torch.profiler table (stderr)

Prints ONE JSON line on stdout:

- train_step_s: mean time of forward + backward + optimizer step (see build_optimizer) on a batch of
  --batch random size x size images with random targets for the meta-architecture: a random ``sem_seg``
  for SemanticSegmentor; otherwise (MaskFormer, R-CNN) ``instances`` with a few random rectangular
  masks (gt_classes, gt_masks as a bool tensor, gt_boxes), laid out as the reference mappers do.
- infer_img_s: mean time of one eval-mode forward of one image (batch 1, no grad).
- forward_gflop: FLOPs of one eval-mode forward of one image from fvcore (through Detectron2's
  FlopCountAnalysis, which skips element-wise ops). fvcore counts one multiply-add as one flop; here a
  multiply-add counts as 2 FLOPs, so forward_gflop = 2 x fvcore's total (forward_gmac is fvcore's total).
  Fused attention (scaled_dot_product_attention) and baddbmm, which fvcore does not know, are counted
  as their two / one matrix products. Operators still left uncounted are listed in flop_uncounted_ops.
- peak_gflops: this machine's fp32 matmul peak measured in the same run: the best of several
  --peak-n x --peak-n float32 torch.mm timings (2 n^3 FLOPs each), with torch's default threads,
  taken before the training steps and again after inference (the better kept).
- train_peak_fraction = (3 x forward_gflop x batch / train_step_s) / peak_gflops (backward taken as
  twice the forward); infer_peak_fraction = (forward_gflop / infer_img_s) / peak_gflops.
- train_step_min_s (the fastest timed step), loadavg_1min (before and after: other processes sharing
  the cores inflate the times), config, size, batch, threads, device, optimizer. Everything runs in
  fp32 (SOLVER.AMP is not applied).

MODEL.WEIGHTS "" and MODEL.DEVICE cpu are applied before the command-line overrides, so nothing is
downloaded unless asked for; an absolute INPUT.CROP.SIZE becomes (size, size) unless given, since the
random images stand for the training crops. Never asserted by tests.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.structures import BitMasks, Instances  # noqa: E402

from selftrain_d2.config import load_config  # noqa: E402
from selftrain_d2.engine import Trainer  # noqa: E402
from selftrain_d2.modeling import build_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(n=2048, repeats=10, device="cpu"):
    """Best fp32 torch.mm throughput of ``repeats`` n x n products, in GFLOP/s (2 n^3 FLOPs each)."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def random_instances(size, num_classes, count, generator):
    """``count`` random rectangles (at least size/8 a side) with random classes, as the mappers give them."""
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    lo = max(size // 8, 1)
    for i in range(count):
        h, w = (int(v) for v in torch.randint(lo, size // 2 + 1, (2,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, size - lo + 1, (2,), generator=generator))
        masks[i, y:y + h, x:x + w] = True
    instances = Instances((size, size))
    instances.gt_classes = torch.randint(0, num_classes, (count,), generator=generator)
    instances.gt_masks = masks
    instances.gt_boxes = BitMasks(masks).get_bounding_boxes()
    return instances


def training_batch(cfg, size, batch, num_instances, generator):
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    semantic_only = cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
    inputs = []
    for _ in range(batch):
        record = {"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
                  "height": size, "width": size}
        if semantic_only:
            record["sem_seg"] = torch.randint(0, num_classes, (size, size), generator=generator)
        else:
            instances = random_instances(size, num_classes, num_instances, generator)
            sem_seg = torch.full((size, size), cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, dtype=torch.long)
            for cls, mask in zip(instances.gt_classes, instances.gt_masks):
                sem_seg[mask] = cls
            record.update(instances=instances, sem_seg=sem_seg)
        inputs.append(record)
    return inputs


def build_optimizer(cfg, model):
    """The optimizer training would use: the Trainer's own build_optimizer where it has one; otherwise
    the reference Mask2Former recipe (selftrain_d2.solver) for MaskFormer and Detectron2's for the rest."""
    if "build_optimizer" not in vars(Trainer) and cfg.MODEL.META_ARCHITECTURE == "MaskFormer":
        try:
            from selftrain_d2.solver import build_optimizer as build_mask_former_optimizer
        except ImportError:
            pass
        else:
            return build_mask_former_optimizer(cfg, model)
    return Trainer.build_optimizer(cfg, model)


def _sdpa_flop(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _baddbmm_flop(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    b, n, k = get_shape(inputs[1])
    return b * n * k * get_shape(inputs[2])[-1]


def forward_flops(model, inputs):
    """(multiply-adds of one eval forward, {uncounted operator: occurrences})."""
    from detectron2.utils.analysis import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent control flow
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        counter = FlopCountAnalysis(model, inputs)
        counter.set_op_handle(**{"aten::scaled_dot_product_attention": _sdpa_flop, "aten::baddbmm": _baddbmm_flop})
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad():
            total = counter.total()
        return total, dict(Counter(counter.unsupported_ops()).most_common())


def benchmark_config(config_file, size, opts):
    """The frozen config of a speed benchmark: no weights, on the CPU, then the KEY VALUE ``opts``; an
    absolute INPUT.CROP.SIZE becomes (size, size) unless given."""
    cfg = load_config(config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"] + list(opts))
    if cfg.INPUT.CROP.TYPE == "absolute" and "INPUT.CROP.SIZE" not in list(opts)[::2]:
        # The random images are the training crops: DeepLab's ASPP sizes its image pooling from this.
        cfg.INPUT.CROP.SIZE = (size, size)
    cfg.freeze()
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--size", type=int, default=384, help="square input size")
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--iters", type=int, default=5, help="timed train steps (and 2x this inference runs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--instances", type=int, default=5, help="random instance masks per training image")
    parser.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul peak measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip the fvcore count (and the fractions)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operators of one train step (to stderr)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    cfg = benchmark_config(args.config_file, args.size, args.opts)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(cfg)
    device = next(model.parameters()).device
    load_before = os.getloadavg()[0]
    peak = matmul_peak_gflops(args.peak_n, device=device)

    optimizer = build_optimizer(cfg, model)
    batches = [training_batch(cfg, args.size, args.batch, args.instances, generator) for _ in range(2)]

    def train_step(batch):
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    for i in range(args.warmup):
        train_step(batches[i % 2])
    step_times = []
    for i in range(args.iters):
        _sync(device)
        start = time.perf_counter()
        train_step(batches[i % 2])
        _sync(device)
        step_times.append(time.perf_counter() - start)
    train_s = sum(step_times) / len(step_times)

    model.eval()
    image = batches[0][0]["image"]
    infer_input = [{"image": image, "height": args.size, "width": args.size}]
    infer_iters = 2 * args.iters
    with torch.no_grad():
        for _ in range(args.warmup):
            model(infer_input)
        _sync(device)
        start = time.perf_counter()
        for _ in range(infer_iters):
            model(infer_input)
        _sync(device)
    infer_s = (time.perf_counter() - start) / infer_iters
    # The peak again, the better of the two kept: other processes may have shared the cores at one time.
    peak = max(peak, matmul_peak_gflops(args.peak_n, device=device))

    result = {"config": args.config_file, "size": args.size, "batch": args.batch,
              "threads": torch.get_num_threads(), "device": str(device),
              "optimizer": type(optimizer).__name__, "train_step_s": round(train_s, 4),
              "train_step_min_s": round(min(step_times), 4), "infer_img_s": round(infer_s, 4),
              "peak_gflops": round(peak, 1)}
    if not args.no_flops:
        macs, uncounted = forward_flops(model, (infer_input,))
        gflop = 2 * macs / 1e9
        result.update({
            "forward_gflop": round(gflop, 2), "forward_gmac": round(macs / 1e9, 2), "flop_uncounted_ops": uncounted,
            "train_peak_fraction": round(3 * gflop * args.batch / train_s / peak, 4),
            "infer_peak_fraction": round(gflop / infer_s / peak, 4),
        })
    result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after: contention
    print(json.dumps(result), flush=True)

    if args.profile:
        model.train()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            train_step(batches[0])
            _sync(device)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=25), file=sys.stderr)


if __name__ == "__main__":
    main()
