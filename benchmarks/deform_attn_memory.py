#!/usr/bin/env python
"""Autograd memory and time of the deformable attention, with and without recomputing the sampling.

    .venv/bin/python benchmarks/deform_attn_memory.py                      # 512x512, batch 2, R50 sizes
    .venv/bin/python benchmarks/deform_attn_memory.py --size 256 --repeats 5
    .venv/bin/python benchmarks/deform_attn_memory.py --train-step configs/coco/instance-segmentation/\
maskformer2_R50_bs16_50ep.yaml --size 384 --threads 1

One encoder layer of the Mask2Former pixel decoder (d_model 256, 8 heads, 4 points, the levels of strides
8 / 16 / 32) on random inputs, in both modes of ``MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_RECOMPUTE``:

- ``op saved MiB``: bytes autograd keeps for the sampling alone (``ms_deform_attn``), counted with
  ``torch.autograd.graph.saved_tensors_hooks``; ``op inputs MiB``: its value, locations and weights
  (the compiled op keeps just these); ``layer saved MiB``: the whole layer (attention, FFN, norms);
- ``fwd+bwd ms``: median time of the layer's forward and backward, the two modes alternating.
The gradients of both modes are compared too (they must be equal: the same ops run twice).

With ``--train-step CONFIG``: the median time of a whole training step (forward, backward, optimizer) of
that config's model on random --size images (benchmarks/model_speed.py's batch), in both modes, alternating
in one process, so that load from other processes affects both alike.
"""
import argparse
import importlib
import statistics
import time

import torch

from bench_utils import benchmark_config, build_optimizer, training_batch  # noqa: E402

from selftrain_d2.modeling.pixel_decoder.msdeformattn import MSDeformAttnEncoderLayer, encoder_reference_points

# The module (the package exports its function under the same name).
msda = importlib.import_module("selftrain_d2.modeling.pixel_decoder.ms_deform_attn")
MIB = 2.0 ** 20


class SavedBytes:
    """Bytes of the tensors autograd saves for backward while the context is open (each storage once)."""

    def __init__(self):
        self.total, self._seen = 0, set()

    def _pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _inputs(size, batch, d_model, generator):
    shapes = [(size // s, size // s) for s in (8, 16, 32)]
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    length = sum(h * w for h, w in shapes)
    src = torch.randn(batch, length, d_model, generator=generator, requires_grad=True)
    pos = torch.randn(batch, length, d_model, generator=generator)
    reference = encoder_reference_points(shapes, src.device).expand(batch, -1, -1, -1)
    return src, pos, reference, shapes, starts


def _op_bytes(layer, src, pos, reference, shapes, starts):
    """(saved bytes of the sampling alone, bytes of its three inputs)."""
    attn = layer.self_attn
    n, lq, _ = src.shape
    query = src + pos
    value = attn.value_proj(src).view(n, lq, attn.n_heads, -1)
    offsets = attn.sampling_offsets(query).view(n, lq, attn.n_heads, attn.n_levels, attn.n_points, 2)
    weights = attn.attention_weights(query).view(n, lq, attn.n_heads, -1).softmax(-1)
    weights = weights.view(n, lq, attn.n_heads, attn.n_levels, attn.n_points)
    locations = msda.deform_sampling_locations(reference, offsets, shapes, attn.n_points)
    with SavedBytes() as saved:
        msda.ms_deform_attn(value, shapes, starts, locations, weights, recompute=attn.recompute)
    inputs = sum(t.numel() * t.element_size() for t in (value, locations, weights))
    return saved.total, inputs


def train_step_times(config_file, size, batch, repeats):
    """Median seconds of a training step of ``config_file``'s model with and without recomputation."""
    from selftrain_d2.modeling import build_model

    cfg = benchmark_config(config_file, size, [])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    data = training_batch(cfg, size, batch, 8, torch.Generator().manual_seed(0))
    attns = [m for m in model.modules() if isinstance(m, msda.MSDeformAttn)]
    times = {False: [], True: []}
    for i in range(repeats + 1):
        for recompute in (False, True) if i % 2 else (True, False):
            for m in attns:
                m.recompute = recompute
            start = time.perf_counter()
            optimizer.zero_grad()
            sum(model(data).values()).backward()
            optimizer.step()
            if i:  # the first round warms up
                times[recompute].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="input image side (square)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--train-step", metavar="CONFIG", help="time a whole training step of this config")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_step:
        t = train_step_times(args.train_step, args.size, args.batch, args.repeats)
        print(f"{args.train_step}, {args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} threads: "
              f"train step {t[False]:.3f} s (save) -> {t[True]:.3f} s (recompute), {t[True] / t[False]:.3f}x")
        return
    d_model = 256
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = MSDeformAttnEncoderLayer(d_model=d_model, d_ffn=1024, dropout=0.0, n_levels=3, n_heads=8, n_points=4)
    src, pos, reference, shapes, starts = _inputs(args.size, args.batch, d_model, g)
    modes = {"save (today)": False, "recompute": True}

    rows, grads, times = {}, {}, {name: [] for name in modes}
    for name, recompute in modes.items():
        layer.self_attn.recompute = recompute
        op_saved, op_inputs = _op_bytes(layer, src, pos, reference, shapes, starts)
        with SavedBytes() as saved:
            out = layer(src, pos, reference, shapes, starts)
        layer.zero_grad()
        src.grad = None
        out.square().mean().backward()
        grads[name] = [src.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        rows[name] = (op_saved, op_inputs, saved.total)
    for _ in range(args.repeats):
        for name, recompute in modes.items():
            layer.self_attn.recompute = recompute
            start = time.perf_counter()
            layer(src, pos, reference, shapes, starts).square().mean().backward()
            times[name].append(time.perf_counter() - start)

    same = all(torch.equal(a, b) for a, b in zip(*grads.values()))
    print(f"one encoder layer, {args.size}x{args.size}, batch {args.batch}, levels {shapes}, "
          f"{torch.get_num_threads()} threads; gradients equal in both modes: {same}")
    print(f"| mode | op saved MiB | op inputs MiB | op saved / inputs | layer saved MiB | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for name in modes:
        op_saved, op_inputs, layer_saved = rows[name]
        print(f"| {name} | {op_saved / MIB:.1f} | {op_inputs / MIB:.1f} | {op_saved / op_inputs:.2f} | "
              f"{layer_saved / MIB:.1f} | {1000 * statistics.median(times[name]):.0f} |")


if __name__ == "__main__":
    main()
