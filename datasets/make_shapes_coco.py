#!/usr/bin/env python
"""Write a small synthetic instance-segmentation dataset in the COCO layout of "your own data":

    OUT/images/<split>_<n>.jpg
    OUT/annotations/{train,unlabeled,val}.json      # COCO: images, polygons, categories

Discs, boxes and triangles (``--classes 3``; more shapes with more classes) of class-typical colours on a
textured background, a few per image, possibly overlapping. Each JSON numbers its images from 1, as tools that
export one file per split do. ``unlabeled.json`` keeps its annotations: they are the held-out labels that
score pseudo labels; a truly unlabelled set would have ``"annotations": []``. The same arguments write the
same files.

    python datasets/make_shapes_coco.py --output my_data
    python datasets/make_shapes_coco.py --output my_data --counts 40 200 40 --size 160 224
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "box", "triangle", "diamond", "hexagon")
# A base hue per class (degrees), jittered per object, so that colour and shape both tell the class.
HUES = (0, 120, 230, 55, 300)
SPLITS = ("train", "unlabeled", "val")


def _polygon(shape, cx, cy, r, angle):
    if shape == "disc":
        n, offset = 24, 0.0
    else:
        n, offset = {"box": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape], angle
    if shape == "box":
        offset = math.pi / 4 + angle
    return [(cx + r * math.cos(offset + 2 * math.pi * k / n), cy + r * math.sin(offset + 2 * math.pi * k / n))
            for k in range(n)]


def _hsv_to_rgb(h, s, v):
    image = Image.new("HSV", (1, 1), (int(h / 360 * 255) % 256, int(s * 255), int(v * 255)))
    return image.convert("RGB").getpixel((0, 0))


def _image(rng, height, width, classes, max_objects):
    base = rng.uniform(70, 150, size=3)
    grad = np.linspace(-25, 25, width)[None, :, None]
    pixels = base[None, None, :] + grad + rng.normal(0, 12, size=(height, width, 3))
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    annotations = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        c = int(rng.integers(len(classes)))
        r = float(rng.uniform(0.12, 0.28) * min(height, width))
        cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
        poly = _polygon(SHAPES[c], cx, cy, r, float(rng.uniform(0, math.pi)))
        colour = _hsv_to_rgb(HUES[c] + rng.uniform(-15, 15), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        draw.polygon(poly, fill=colour)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
        x1, y1 = min(float(width), max(xs)), min(float(height), max(ys))
        annotations.append({
            "category_id": c + 1,
            "segmentation": [[round(v, 2) for p in poly for v in p]],
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round(0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))), 2),
            "iscrowd": 0,
        })
    return canvas, annotations


def make_dataset(output, counts=(24, 48, 16), size=(96, 128), num_classes=3, max_objects=3, seed=0):
    """Write the dataset (module docstring) under ``output``; returns ``{split: json path}``."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    classes = SHAPES[:num_classes]
    height, width = size
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
    paths = {}
    for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
        rng = np.random.default_rng([seed, split_index])
        images, annotations = [], []
        for i in range(count):
            canvas, objs = _image(rng, height, width, classes, max_objects)
            file_name = f"{split}_{i:04d}.jpg"
            canvas.save(os.path.join(output, "images", file_name), quality=95)
            images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
            for obj in objs:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **obj})
        coco = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)],
        }
        paths[split] = os.path.join(output, "annotations", f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(coco, f)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="dataset folder (images/ and annotations/ go inside)")
    p.add_argument("--counts", type=int, nargs=3, default=[24, 48, 16], metavar=("TRAIN", "UNLABELED", "VAL"),
                   help="images per split (default: 24 48 16)")
    p.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--classes", type=int, default=3, help=f"number of shape classes, 1..{len(SHAPES)}")
    p.add_argument("--max-objects", type=int, default=3, help="objects per image: 1 to this many")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.counts) < 1 or min(args.size) < 16 or args.max_objects < 1:
        p.error("--counts must be >= 1, --size >= 16 and --max-objects >= 1")
    try:
        paths = make_dataset(args.output, args.counts, args.size, args.classes, args.max_objects, args.seed)
    except ValueError as e:
        sys.exit(f"make_shapes_coco: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
