#!/usr/bin/env python
"""COCO mask (and box) AP of synthetic predictions: faster-coco-eval's compiled COCOeval against pycocotools',
both through the project's evaluator (selftrain_d2.evaluation.FastCOCOEvaluator, Detectron2's COCOEvaluator).

    .venv/bin/python benchmarks/coco_eval_speed.py                          # 500 images, 20 instances each
    .venv/bin/python benchmarks/coco_eval_speed.py --images 100 --tasks segm bbox --repeats 3

Ground truth: ``--images`` images of ``--size`` pixels with ``--instances`` objects each (rectangles and
ellipses of 5 classes, 5% crowd); predictions: each object found again with its outline shifted by a few
pixels (10% with another class), missed ones left out, plus false positives, all with random scores. Both
evaluators get the same predictions (``process`` is not timed); ``evaluate`` is timed, alternating, and the
table gives the median seconds, the ratio and whether every AP figure is equal. Never asserted by tests.
"""
import argparse
import copy
import json
import math
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _mask(rng, height, width):
    mask = np.zeros((height, width), np.uint8)
    h, w = rng.integers(6, max(7, height // 3)), rng.integers(6, max(7, width // 3))
    y, x = rng.integers(0, height - h), rng.integers(0, width - w)
    if rng.random() < 0.5:
        mask[y:y + h, x:x + w] = 1
    else:
        yy, xx = np.ogrid[:height, :width]
        mask[((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1] = 1
    return mask


def synthetic_coco(folder, num_images=500, instances=20, size=(256, 320), num_classes=5, seed=0):
    """Write ``folder/gt.json`` (COCO instances, RLE masks) and return ``(json_file, predictions)``:
    ``predictions()`` yields ``(image_id, Instances)`` one image at a time (masks are not kept in memory)."""
    from detectron2.structures import Boxes, Instances
    from pycocotools import mask as mask_util

    height, width = size
    rng = np.random.default_rng(seed)
    images, annotations, truth = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
        truth[image_id] = []
        for _ in range(instances):
            mask, category = _mask(rng, height, width), int(rng.integers(1, num_classes + 1))
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": rle, "area": float(mask_util.area(rle)),
                                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                                "iscrowd": int(rng.random() < 0.05)})
            truth[image_id].append((mask, category))
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    json_file = os.path.join(folder, "gt.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)

    def predictions():
        prng = np.random.default_rng(seed + 1)
        for image_id, objects in truth.items():
            masks, classes = [], []
            for mask, category in objects:
                if prng.random() < 0.15:
                    continue  # missed
                dy, dx = prng.integers(-3, 4, size=2)
                masks.append(np.roll(mask, (dy, dx), axis=(0, 1)))
                classes.append(category if prng.random() < 0.9 else int(prng.integers(1, num_classes + 1)))
            for _ in range(instances // 4):  # false positives
                masks.append(_mask(prng, height, width))
                classes.append(int(prng.integers(1, num_classes + 1)))
            masks = torch.from_numpy(np.stack(masks)).bool()
            result = Instances((height, width))
            result.pred_masks = masks
            result.pred_classes = torch.tensor(classes) - 1  # contiguous ids
            result.scores = torch.from_numpy(prng.random(len(classes)).astype(np.float32))
            ys, xs = masks.any(2), masks.any(1)
            boxes = [[x.nonzero().min(), y.nonzero().min(), x.nonzero().max() + 1, y.nonzero().max() + 1]
                     for y, x in zip(ys, xs)]
            result.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            yield image_id, result

    return json_file, predictions


def register_synthetic(name, json_file):
    """Register the ground truth as a COCO dataset and load it once, as a test loader would: loading sets the
    metadata's class-id mapping, which the evaluator needs to give predictions their dataset ids."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_file, os.path.dirname(json_file))
    DatasetCatalog.get(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    parser.add_argument("--tasks", nargs="+", default=["segm"], choices=["segm", "bbox"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from selftrain_d2.evaluation import FastCOCOEvaluator
    from selftrain_d2.evaluation.coco import compiled_cocoeval

    if compiled_cocoeval() is None:
        sys.exit("faster-coco-eval is not importable: run `make setup`")
    folder = tempfile.mkdtemp(prefix="coco_eval_speed_")
    start = time.perf_counter()
    json_file, predictions = synthetic_coco(folder, args.images, args.instances, tuple(args.size))
    register_synthetic("coco_eval_speed_synthetic", json_file)
    evaluators = {name: FastCOCOEvaluator("coco_eval_speed_synthetic", tasks=tuple(args.tasks), distributed=False,
                                          compiled=(name == "faster-coco-eval"))
                  for name in ("pycocotools", "faster-coco-eval")}
    for evaluator in evaluators.values():
        evaluator.reset()
    for image_id, instances in predictions():
        for evaluator in evaluators.values():
            evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    print(f"# data and predictions: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    # Detectron2's evaluate() maps the predictions' class ids in place: each run gets a fresh copy.
    processed = {name: evaluator._predictions for name, evaluator in evaluators.items()}
    seconds, results = {name: [] for name in evaluators}, {}
    for _ in range(args.repeats):
        for name, evaluator in evaluators.items():
            evaluator._predictions = copy.deepcopy(processed[name])
            t = time.perf_counter()
            results[name] = evaluator.evaluate()
            seconds[name].append(time.perf_counter() - t)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    same = same_results(results["pycocotools"], results["faster-coco-eval"])
    print(f"COCO {'+'.join(args.tasks)} evaluation of {args.images} images x {args.instances} instances "
          f"({args.size[0]}x{args.size[1]}), {args.repeats} runs each (loadavg {os.getloadavg()[0]:.1f})")
    print("| COCOeval | seconds (median) | AP (segm) |")
    print("|---|---|---|")
    for name in evaluators:
        ap = results[name].get("segm", results[name].get("bbox", {})).get("AP")
        print(f"| {name} | {median[name]:.2f} | {ap:.3f} |")
    print(f"faster-coco-eval / pycocotools: {median['pycocotools'] / median['faster-coco-eval']:.1f}x faster; "
          f"every AP figure equal (to 1e-9): {'yes' if same else 'NO'}")
    for task in results["pycocotools"]:
        for key, value in results["pycocotools"][task].items():
            other = results["faster-coco-eval"][task].get(key)
            if not same_results(value, other):
                print(f"  {task} {key}: pycocotools {value}, faster-coco-eval {other}")


def same_results(a, b):
    """Equal Detectron2 results (nested dicts of floats): to 1e-9 relative (the last bits of a mean depend on
    the order of the sum), NaN (no object of that size) equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_results(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


if __name__ == "__main__":
    main()
