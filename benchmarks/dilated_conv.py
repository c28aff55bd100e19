#!/usr/bin/env python
"""The ASPP with and without skipping the dilated kernel taps that only read padding, at each crop of a schedule.

    .venv/bin/python benchmarks/dilated_conv.py
    .venv/bin/python benchmarks/dilated_conv.py --config-file CFG --scales 0.5 1.0 --rounds 6 [KEY VALUE ...]

Builds the model of ``--config-file`` with the global-pool head (as benchmarks/fast_schedules.py does), whose
ASPP runs its dilated convolutions through ``selftrain_d2.modeling.dilated_conv``, and a copy whose converted
convolutions run the full kernel. For each (crop, batch) of the crop schedule's scales it times forward +
backward of the ASPP alone on a random res5 map of that crop, both variants in turns over --rounds rounds,
and checks that outputs and input gradients agree. Prints a table (crop, batch, res5 map, median ms with and
without skipping, speed-up, largest output difference) or with --json one JSON list. Never asserted by tests.
"""
import copy
import statistics
import time

import torch
from detectron2.layers import Conv2d

from bench_utils import parse_args, print_table, schedule_config, schedule_shapes  # noqa: E402
from selftrain_d2.modeling import build_model  # noqa: E402
from selftrain_d2.modeling.dilated_conv import PaddingFreeConv2d  # noqa: E402


def full_kernel_copy(module):
    """A copy of ``module`` whose PaddingFreeConv2d layers run Detectron2's Conv2d.forward (every tap)."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if type(m) is PaddingFreeConv2d:
            m.__class__ = Conv2d
    return module


def main():
    args = parse_args(__doc__, steps=5)
    cfg = schedule_config(args)
    torch.manual_seed(0)
    model = build_model(cfg)
    in_feature = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[-1]
    aspp = model.sem_seg_head.decoder[in_feature]["project_conv"].train()
    variants = {"skip": aspp, "full": full_kernel_copy(aspp)}
    channels = model.backbone.output_shape()[in_feature].channels
    stride = model.backbone.output_shape()[in_feature].stride
    memory_format = torch.channels_last if cfg.MODEL.CHANNELS_LAST else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    inputs = {s: torch.randn(s[1], channels, s[0][0] // stride, s[0][1] // stride, generator=generator)
              .contiguous(memory_format=memory_format) for s in schedule_shapes(cfg)}

    def step(module, x):
        x = x.detach().requires_grad_()
        torch.manual_seed(1)  # the ASPP's dropout: the same mask for both variants
        y = module(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad

    diffs = {}
    for shape, x in inputs.items():
        (y_skip, g_skip), (y_full, g_full) = step(variants["skip"], x), step(variants["full"], x)
        diffs[shape] = max((y_skip - y_full).abs().max().item(), (g_skip - g_full).abs().max().item())
    times = {(s, v): [] for s in inputs for v in variants}
    for r in range(args.rounds):
        for shape in (list(inputs) if r % 2 == 0 else list(inputs)[::-1]):
            for name in (("skip", "full") if r % 2 == 0 else ("full", "skip")):
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step(variants[name], inputs[shape])
                    times[shape, name].append(time.perf_counter() - start)

    rows = []
    for (crop, batch), x in inputs.items():
        skip = statistics.median(times[(crop, batch), "skip"])
        full = statistics.median(times[(crop, batch), "full"])
        rows.append({"crop": list(crop), "batch": batch, "map": list(x.shape[-2:]), "skip_ms": round(1000 * skip, 2),
                     "full_ms": round(1000 * full, 2), "speedup": round(full / skip, 2),
                     "max_abs_diff": diffs[(crop, batch)]})
    print_table(rows, f"ASPP of {in_feature} ({channels} channels, dilations "
                      f"{list(cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS)}), forward + backward, {args.rounds} rounds x "
                      f"{args.steps} steps, {torch.get_num_threads()} threads",
                [("crop", lambda r: f"{r['crop'][0]}x{r['crop'][1]}"), ("batch", "batch"),
                 ("map", lambda r: f"{r['map'][0]}x{r['map'][1]}"), ("skipping taps (ms)", "skip_ms"),
                 ("full kernel (ms)", "full_ms"), ("speed-up", "speedup"),
                 ("max abs diff", lambda r: f"{r['max_abs_diff']:.1e}")], args.json)

if __name__ == "__main__":
    main()
