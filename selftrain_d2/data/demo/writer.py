"""Rendering demo images by (domain, split, index) and writing one split to a folder.

A split folder holds ``images/<id>.jpg`` (RGB, JPEG quality 95), ``sem_seg/<id>.png`` (single-channel
train ids, 255 = ignore), ``instances.json`` (COCO format: RLE masks, XYWH boxes, string image ids equal
to ``<id>``) and ``stats.json`` (pixel and instance counts per class). ``<id>`` is ``image_id(...)``,
e.g. ``city_val_0007``. The files hold no timestamps or absolute paths, so regenerating with the same
code and seed gives byte-identical labels and JSON.
"""
import json
import multiprocessing
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .classes import (
    DEFAULT_SEED,
    DOMAIN_CLASSES,
    DOMAIN_THING_CLASSES,
    DOMAINS,
    GENERATOR_VERSION,
    IGNORE_LABEL,
    SPLITS,
)
from .scenes import Scene, draw_scene

__all__ = [
    "image_id", "scene_rng", "render_scene", "encode_instances", "coco_categories",
    "write_split", "write_splits",
]

JPEG_QUALITY = 95
PNG_COMPRESSION = 3
_SUPERCATEGORY = {"car": "vehicle", "truck": "vehicle", "bicycle": "vehicle", "person": "human"}


def image_id(domain, split, index):
    """The string id (and file stem) of an image, e.g. ``city_val_0007``."""
    return f"{domain}_{split}_{index:04d}"


def scene_rng(seed, domain, split, index):
    """The Generator for one image: any image can be redrawn on its own, in any order."""
    return np.random.default_rng([int(seed), DOMAINS.index(domain), SPLITS.index(split), int(index)])


def render_scene(domain, split, index, seed=DEFAULT_SEED) -> Scene:
    return draw_scene(scene_rng(seed, domain, split, index), domain)


def coco_categories(domain):
    """COCO categories of the domain's thing classes: ids 1..K in the domain's class order."""
    return [
        {"id": k + 1, "name": name, "supercategory": _SUPERCATEGORY[name]}
        for k, name in enumerate(DOMAIN_THING_CLASSES[domain])
    ]


def encode_instances(scene, domain):
    """COCO annotation dicts (no ``id`` / ``image_id`` yet) for the scene's instances."""
    classes = DOMAIN_CLASSES[domain]
    category = {classes.index(name): k + 1 for k, name in enumerate(DOMAIN_THING_CLASSES[domain])}
    anns = []
    for train_id, mask in scene.instances:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append({
            "category_id": category[train_id],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return anns


def _imwrite(path, array, params):
    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"could not write {path}")


def _render_chunk(job):
    """Render and write images [start, stop) of one split; returns what the split's JSON / stats need."""
    split_dir, domain, split, start, stop, seed = job
    split_dir = Path(split_dir)
    hist = np.zeros(256, np.int64)
    images, annotations = [], []
    for index in range(start, stop):
        name = image_id(domain, split, index)
        scene = render_scene(domain, split, index, seed)
        height, width = scene.label.shape
        _imwrite(split_dir / "images" / f"{name}.jpg", scene.image[:, :, ::-1],
                 [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        _imwrite(split_dir / "sem_seg" / f"{name}.png", scene.label, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
        hist += np.bincount(scene.label.ravel(), minlength=256)
        images.append({"id": name, "file_name": f"{name}.jpg", "height": int(height), "width": int(width)})
        annotations.extend({"image_id": name, **ann} for ann in encode_instances(scene, domain))
    return images, annotations, hist


def _finish_split(split_dir, domain, split, parts):
    """Write instances.json and stats.json from the chunks' results (in index order)."""
    classes = DOMAIN_CLASSES[domain]
    images = [img for part in parts for img in part[0]]
    annotations = [{"id": k + 1, **ann} for k, ann in enumerate(a for part in parts for a in part[1])]
    hist = sum((part[2] for part in parts), np.zeros(256, np.int64))
    coco = {
        "info": {"description": f"selftrain-d2 synthetic demo scenes: {domain} {split}",
                 "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "categories": coco_categories(domain),
        "images": images,
        "annotations": annotations,
    }
    with open(Path(split_dir) / "instances.json", "w") as f:
        json.dump(coco, f)
    labelled = int(hist[: len(classes)].sum())
    name_of = {c["id"]: c["name"] for c in coco["categories"]}
    stats = {
        "domain": domain,
        "split": split,
        "num_images": len(images),
        "total_pixels": int(hist.sum()),
        "ignore_pixels": int(hist[IGNORE_LABEL]),
        "pixel_counts": {c: int(hist[i]) for i, c in enumerate(classes)},
        # share of the labelled (non-ignore) pixels
        "pixel_share": {c: round(int(hist[i]) / max(labelled, 1), 6) for i, c in enumerate(classes)},
        "instance_counts": {n: sum(1 for a in annotations if name_of[a["category_id"]] == n)
                            for n in DOMAIN_THING_CLASSES[domain]},
    }
    with open(Path(split_dir) / "stats.json", "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def _worker_init():
    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would only compete


def write_splits(jobs, workers=None, chunk_size=20):
    """Write several splits; ``jobs`` holds (split_dir, domain, split, count, seed) tuples.

    Images are rendered in chunks; with ``workers`` > 1 in that many worker processes (Linux only).
    The default is one process: on the 2-vCPU machines this was measured on, a second process gave no
    speed-up. The output does not depend on the number of workers. Returns {(domain, split): stats}.
    """
    chunks = []
    for split_dir, domain, split, count, seed in jobs:
        (Path(split_dir) / "images").mkdir(parents=True, exist_ok=True)
        (Path(split_dir) / "sem_seg").mkdir(parents=True, exist_ok=True)
        chunks += [(str(split_dir), domain, split, a, min(a + chunk_size, count), int(seed))
                   for a in range(0, count, chunk_size)]
    if workers is None:
        workers = 1
    if workers > 1 and len(chunks) > 1 and sys.platform == "linux" and not multiprocessing.current_process().daemon:
        # spawn, not fork: a forked child inherits OpenCV's thread pool mid-state when the parent has used it
        # (cv2 calls elsewhere in the process), and then hangs in its first cv2 call.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks)), initializer=_worker_init) as pool:
            results = pool.map(_render_chunk, chunks, chunksize=1)
    else:
        results = [_render_chunk(c) for c in chunks]
    stats = {}
    for split_dir, domain, split, _count, _seed in jobs:
        parts = [r for c, r in zip(chunks, results) if c[0] == str(split_dir)]
        stats[(domain, split)] = _finish_split(split_dir, domain, split, parts)
    return stats


def write_split(split_dir, domain, split, count, seed=DEFAULT_SEED, workers=None):
    """Render ``count`` images of ``domain``/``split`` into ``split_dir``; returns the stats dict."""
    return write_splits([(split_dir, domain, split, count, seed)], workers)[(domain, split)]
