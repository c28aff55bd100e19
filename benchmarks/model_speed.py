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
import os
import sys
import time

import torch
from bench_utils import benchmark_config, build_optimizer, forward_flops, matmul_peak_gflops, sync, training_batch

from selftrain_d2.modeling import build_model  # noqa: E402


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
        sync(device)
        start = time.perf_counter()
        train_step(batches[i % 2])
        sync(device)
        step_times.append(time.perf_counter() - start)
    train_s = sum(step_times) / len(step_times)

    model.eval()
    image = batches[0][0]["image"]
    infer_input = [{"image": image, "height": args.size, "width": args.size}]
    infer_iters = 2 * args.iters
    with torch.no_grad():
        for _ in range(args.warmup):
            model(infer_input)
        sync(device)
        start = time.perf_counter()
        for _ in range(infer_iters):
            model(infer_input)
        sync(device)
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
            sync(device)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=25), file=sys.stderr)


if __name__ == "__main__":
    main()
