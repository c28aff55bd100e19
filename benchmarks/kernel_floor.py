#!/usr/bin/env python
"""How fast a model could be if nothing but its matrix products ran: the sum of its convolutions and
matmuls, each timed alone at its best, against the whole model.

    .venv/bin/python benchmarks/kernel_floor.py --config-file configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml --size 384 --batch 2 [KEY VALUE ...]

Records every convolution, matmul and fused attention (forward, and for training also backward) that one
eval forward of one image (``infer``) and one train step of --batch images (``train``, forward + backward)
call, with shapes, strides, dtypes and arguments (a TorchDispatchMode below autograd). Each recorded call
is then replayed alone on random tensors of the same layout, warm, best of --repeats, and the times are
summed: the kernel floor. The whole model is timed the same way (best of --repeats). With the forward FLOP
count of model_speed.py (fvcore; multiply-add = 2, train = 3x forward x batch) and the matmul peak measured
in the same run, it prints one JSON line:

- ``infer_img_s`` / ``train_step_s``: the model, best of --repeats;
- ``infer_kernel_floor_s`` / ``train_kernel_floor_s``: the sum of the isolated products;
- ``*_peak_fraction``: the model's achieved fraction of the peak, as in model_speed.py;
- ``*_peak_fraction_bound``: the fraction the model would reach if it took only its kernel floor, i.e. no
  element-wise, normalisation, sampling, copy or Python time at all and every product as fast as alone.
  A speed target above this bound can't be met by removing overhead around these kernels; it needs faster
  kernels for the same shapes (or other shapes: fewer, larger products).
- ``*_top_ops``: the slowest recorded products (operator, shapes, ms summed over calls, GFLOP/s).

Everything in fp32 on the model's device, with torch's default threads. Never asserted by tests.
"""
import argparse
import json
import math
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench_utils import (  # noqa: E402
    benchmark_config, build_optimizer, forward_flops, matmul_peak_gflops, training_batch,
)

from selftrain_d2.modeling import build_model  # noqa: E402

aten = torch.ops.aten
PRODUCTS = {
    aten.convolution.default,
    aten.convolution_backward.default,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


def _spec(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return x


def _make(spec, generator):
    if isinstance(spec, tuple) and spec and spec[0] == "T":
        _, shape, stride, dtype, device = spec
        storage = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        flat = torch.randn(max(storage, 1), generator=generator).to(dtype=dtype, device=device)
        return flat.as_strided(shape, stride)
    if isinstance(spec, tuple):
        return tuple(_make(v, generator) for v in spec)
    return spec


class ProductRecorder(TorchDispatchMode):
    """Counts the calls of each distinct (operator, argument layout) among PRODUCTS."""

    def __init__(self):
        super().__init__()
        self.calls = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            self.calls[(func, _spec(args), _spec(tuple(sorted(kwargs.items()))))] += 1
        return func(*args, **kwargs)


def _product_flop(func, args):
    """FLOPs (multiply-add = 2) of a recorded product, from its argument specs; None if unknown."""
    shape = [a[1] if isinstance(a, tuple) and a and a[0] == "T" else None for a in args]
    if func is aten.mm.default:
        (m, k), (_, n) = shape[0], shape[1]
        return 2 * m * k * n
    if func is aten.addmm.default:
        (m, k), (_, n) = shape[1], shape[2]
        return 2 * m * k * n
    if func is aten.bmm.default:
        (b, m, k), (_, _, n) = shape[0], shape[1]
        return 2 * b * m * k * n
    if func is aten.baddbmm.default:
        (b, m, k), (_, _, n) = shape[1], shape[2]
        return 2 * b * m * k * n
    if func is aten.convolution.default:
        out_channels, in_per_group = shape[1][0], shape[1][1]
        kernel = math.prod(shape[1][2:])
        # output positions from the standard formula (stride, padding, dilation are args 3..5)
        spatial = []
        for i, size in enumerate(shape[0][2:]):
            stride, pad, dil = args[3][i], args[4][i], args[5][i]
            spatial.append((size + 2 * pad - dil * (shape[1][2 + i] - 1) - 1) // stride + 1)
        return 2 * shape[0][0] * out_channels * in_per_group * kernel * math.prod(spatial)
    if func is aten.convolution_backward.default:
        grad, weight = shape[0], shape[2]
        out_mask = args[-1]
        per_pass = 2 * grad[0] * weight[0] * weight[1] * math.prod(weight[2:]) * math.prod(grad[2:])
        return per_pass * (int(out_mask[0]) + int(out_mask[1]))
    if func is aten._scaled_dot_product_flash_attention_for_cpu.default:
        q, k = shape[0], shape[1]
        return 2 * math.prod(q[:-1]) * k[-2] * 2 * q[-1]
    if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        q, k = shape[1], shape[2]
        return 2 * 2 * math.prod(q[:-1]) * k[-2] * 2 * q[-1]
    return None


def _best_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def kernel_floor(calls, repeats, top=8):
    """(seconds summed over every call, the ``top`` slowest layouts as dicts)."""
    generator = torch.Generator().manual_seed(0)
    total, rows = 0.0, []
    with torch.no_grad():
        for (func, arg_spec, kwarg_spec), count in calls.items():
            args, kwargs = _make(arg_spec, generator), dict(_make(kwarg_spec, generator))
            seconds = _best_time(lambda: func(*args, **kwargs), repeats) * count
            total += seconds
            flop = _product_flop(func, arg_spec)
            shapes = [a[1] for a in arg_spec if isinstance(a, tuple) and a and a[0] == "T"]
            rows.append({"op": str(func.overloadpacket.__name__), "shapes": shapes, "calls": count,
                         "ms": round(seconds * 1e3, 2),
                         "gflops": round(flop * count / seconds / 1e9, 1) if flop else None})
    rows.sort(key=lambda r: -r["ms"])
    return total, rows[:top]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="slowest product layouts listed per pass")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()

    cfg = benchmark_config(args.config_file, args.size, args.opts)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    batch = training_batch(cfg, args.size, args.batch, args.instances, generator)
    infer_input = [{"image": batch[0]["image"], "height": args.size, "width": args.size}]

    def train_step():
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer():
        with torch.no_grad():
            model(infer_input)

    peak = matmul_peak_gflops()
    model.train()
    train_s = _best_time(train_step, args.repeats)
    train_rec = ProductRecorder()
    with train_rec:
        train_step()
    model.eval()
    infer_s = _best_time(infer, args.repeats * 2)
    infer_rec = ProductRecorder()
    with infer_rec:
        infer()
    train_floor, train_top = kernel_floor(train_rec.calls, args.repeats, args.top)
    infer_floor, infer_top = kernel_floor(infer_rec.calls, args.repeats, args.top)
    peak = max(peak, matmul_peak_gflops())
    gmac, _ = forward_flops(model, infer_input)
    gflop = 2 * gmac / 1e9
    result = {
        "config": args.config_file, "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
        "peak_gflops": round(peak, 1), "forward_gflop": round(gflop, 2),
        "train_step_s": round(train_s, 4), "train_kernel_floor_s": round(train_floor, 4),
        "train_peak_fraction": round(3 * gflop * args.batch / train_s / peak, 3),
        "train_peak_fraction_bound": round(3 * gflop * args.batch / train_floor / peak, 3),
        "infer_img_s": round(infer_s, 4), "infer_kernel_floor_s": round(infer_floor, 4),
        "infer_peak_fraction": round(gflop / infer_s / peak, 3),
        "infer_peak_fraction_bound": round(gflop / infer_floor / peak, 3),
        "train_top_ops": train_top, "infer_top_ops": infer_top,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
