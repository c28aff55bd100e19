"""What several benchmarks share: this checkout's package first on sys.path, a model config with random
weights, synthetic training batches, FLOP counts, the crop-schedule shapes and the table printer.

Benchmarks import it as ``import bench_utils`` (Python puts the running script's folder, benchmarks/, on
sys.path), instead of importing each other.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's selftrain_d2, whichever is installed

from detectron2.structures import BitMasks, Instances  # noqa: E402

from selftrain_d2.config import load_config  # noqa: E402
from selftrain_d2.data.crop_schedules import EpochTable  # noqa: E402
from selftrain_d2.engine import Trainer  # noqa: E402

__all__ = [
    "ROOT", "benchmark_config", "build_optimizer", "forward_flops", "matmul_peak_gflops", "parse_args",
    "print_table", "random_batch", "random_instances", "schedule_config", "schedule_shapes", "sync",
    "training_batch",
]


def sync(device):
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
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
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
