#!/usr/bin/env python
"""Time a guided-distillation training step against the sum of its parts, measured separately.

    .venv/bin/python benchmarks/semisup_step.py --config-file configs/demo/guided-distillation-student.yaml
    .venv/bin/python benchmarks/semisup_step.py --config-file CFG --iters 20 MODEL.DEVICE cuda

The step is SemiSupervisedStep.run_step in the EMA stage (teacher forward on the weak views, pseudo labels,
student forward/backward on the labeled and the strong unlabeled batch, optimizer step, metrics) plus the
EMA update of the teacher. The parts are the teacher forward, the student forward/backward on each batch
(with the pseudo labels of a previous teacher forward), the optimizer step and the EMA update, each timed
alone on the same fixed batches (data loading is excluded everywhere). Prints one JSON line of medians:
step_s, parts_s (teacher forward + both forward/backward passes), step_over_parts, the other parts, and
ema_share_of_step. The run starts at the EMA stage, with the teacher a copy of the student: give a trained
model as MODEL.WEIGHTS for realistic pseudo labels (an untrained one gives none, which makes the student's
unlabeled pass cheaper). Never asserted by tests.
"""
import argparse
import itertools
import json
import os
import statistics
import time

import torch

import bench_utils  # noqa: E402,F401  (first: puts this checkout's package on sys.path)
from detectron2.utils.events import EventStorage  # noqa: E402

from selftrain_d2.config import load_config  # noqa: E402
from selftrain_d2.data.datasets import register_from_cfg  # noqa: E402
from selftrain_d2.engine import SemiSupervisedTrainer  # noqa: E402
from selftrain_d2.teacher import copy_weights_, ema_update_  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = load_config(args.config_file, args.opts + ["SEMISUP.BURN_IN_ITERS", "0", "DATASETS.TEST", "()",
                                                      "OUTPUT_DIR", os.path.join("output", "benchmarks", "semisup_step")])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    register_from_cfg(cfg)
    cfg.freeze()
    trainer = SemiSupervisedTrainer(cfg)
    trainer.resume_or_load(resume=False)
    step, teacher = trainer.train_step, trainer.teacher
    model, optimizer, decay = step.model, step.optimizer, cfg.SEMISUP.EMA_DECAY
    copy_weights_(teacher.model, model)  # what the schedule hook does when the EMA stage starts
    device = next(model.parameters()).device

    labeled = next(iter(step.data_loader))
    unlabeled = step._unlabeled_batch(0)
    weak = [{"image": r["image"]} for r in unlabeled]
    step._data_loader_iter_obj = itertools.repeat(labeled)
    step._unlabeled_batch = lambda iteration: unlabeled

    with EventStorage(0):
        outputs = teacher.predict(weak)
        targets = step.labeler(*outputs)
        strong = step.student_inputs(unlabeled, targets)

        def full_step():
            step.iter = 0  # EMA stage; an unlabeled batch every step
            step.run_step()
            ema_update_(teacher.model, model, decay)

        def forward_backward(batch):
            def run():
                optimizer.zero_grad()
                sum(model(batch).values()).backward()
            return run

        result = {
            "config": args.config_file,
            "device": str(device),
            "labeled_batch": len(labeled),
            "unlabeled_batch": len(unlabeled),
            "pseudo_objects_per_image": (sum(len(t["labels"]) for t in targets) / len(targets)
                                         if step.labeler.targets == "instance" else None),
            "step_s": _median_time(full_step, device, args.iters, args.warmup),
            "teacher_forward_s": _median_time(lambda: teacher.predict(weak), device, args.iters, args.warmup),
            "pseudo_labels_s": _median_time(lambda: step.labeler(*outputs), device, args.iters, args.warmup),
            "student_fwd_bwd_labeled_s": _median_time(forward_backward(labeled), device, args.iters, args.warmup),
            "student_fwd_bwd_unlabeled_s": _median_time(forward_backward(strong), device, args.iters, args.warmup),
            "optimizer_step_s": _median_time(optimizer.step, device, args.iters, args.warmup),
            "ema_update_s": _median_time(lambda: ema_update_(teacher.model, model, decay), device, args.iters,
                                         args.warmup),
        }
    parts = result["teacher_forward_s"] + result["student_fwd_bwd_labeled_s"] + result["student_fwd_bwd_unlabeled_s"]
    result["parts_s"] = parts
    result["step_over_parts"] = result["step_s"] / parts
    result["step_over_parts_with_optimizer"] = result["step_s"] / (parts + result["optimizer_step_s"])
    result["ema_share_of_step"] = result["ema_update_s"] / result["step_s"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
