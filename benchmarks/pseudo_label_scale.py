#!/usr/bin/env python
"""Pseudo labelling and centroid indexing at 1k and 10k demo-size images: speed against the baseline (the code
before issue 26, benchmarks/pseudo_label_baseline.py), and whether memory grows with the dataset (it should
not: labels are written as they are made, and the index keeps only centroids).

    .venv/bin/python benchmarks/pseudo_label_scale.py --sizes 300 --threads 1 --repeats 2   # now vs baseline
    .venv/bin/python benchmarks/pseudo_label_scale.py --sizes 1000 10000 --variants now --output output/bench/pl
    .venv/bin/python benchmarks/pseudo_label_scale.py --sizes 100 1000 --json

For each size N, a folder of N symlinks cycling over the demo city unlabelled images (128x256) is labelled by
the demo DeepLabV3+ (``--config-file``; with ``--weights`` a trained teacher, otherwise a freshly initialised
one saved once: the cost does not depend on the weights), then indexed. Each size and variant (``now``,
``baseline``; ``--repeats`` times, in the order ABBA... so that a trend in other processes' load evens out)
runs in its own process with ``--threads`` torch threads. ``label img/s`` counts the whole call (the teacher
built once per run), ``label CPU s`` the CPU time of all its threads; peak resident memory is ru_maxrss.
Where both variants ran, their label files are compared byte for byte and the throughput ratio (medians)
printed. Prints a table, or one JSON object with rows (variant, images, label_s, label_cpu_s,
label_images_per_s, index_s, index_images_per_s, peak_rss_mb), ratios and same_files. Never asserted by tests.
"""
import argparse
import filecmp
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench_utils import ROOT  # this checkout's package first on sys.path


def _make_folder(folder, n):
    from detectron2.data import DatasetCatalog

    import selftrain_d2

    selftrain_d2.register_all()  # the demo datasets

    sources = [r["file_name"] for r in DatasetCatalog.get("demo_city_unlabeled_sem_seg")]
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        link = os.path.join(folder, f"{i // 1000:03d}", f"img_{i:06d}.png")
        if not os.path.lexists(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(sources[i % len(sources)], link)


def _child(args):
    """One size, in its own process: label the folder, index the labels, print timings as JSON."""
    import torch

    from selftrain_d2.config import load_config
    from selftrain_d2.data.centroids import build_centroid_index
    from selftrain_d2.pseudo_labels import PseudoLabelFolder, generate_pseudo_labels

    if args.child_variant == "baseline":
        from pseudo_label_baseline import load_baseline

        generate_pseudo_labels = load_baseline().generate.generate_pseudo_labels

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, ["MODEL.WEIGHTS", args.weights, "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
                                         "OUTPUT_DIR", args.child_output])
    start, cpu = time.perf_counter(), time.process_time()
    report = generate_pseudo_labels(cfg, args.child_folder, args.child_output)
    label_s, label_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    records = PseudoLabelFolder(args.child_output).records()
    start = time.perf_counter()
    index = build_centroid_index(records, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 16)
    index_s = time.perf_counter() - start
    n = report["written"] + report["already_done"]
    print(json.dumps({
        "variant": args.child_variant, "images": n, "label_s": label_s, "label_cpu_s": label_cpu_s,
        "label_images_per_s": report["written"] / label_s if label_s else None,
        "index_s": index_s, "index_images_per_s": len(records) / index_s, "centroids": len(index),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--config-file",
                        default=os.path.join(ROOT, "configs", "demo", "deeplabv3plus-effnetlite0.yaml"))
    parser.add_argument("--weights", default="")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "bench", "pl_scale"))
    parser.add_argument("--threads", type=int, default=torch_threads_default())
    parser.add_argument("--variants", nargs="+", choices=["now", "baseline"], default=["now", "baseline"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant per size, alternating")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child-folder", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", default="now", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_folder:
        return _child(args)

    os.makedirs(args.output, exist_ok=True)
    if not args.weights:
        args.weights = os.path.join(args.output, "random_teacher.pth")
        if not os.path.isfile(args.weights):
            import torch

            from selftrain_d2.config import load_config
            from selftrain_d2.modeling import build_model
            from selftrain_d2.utils.io import atomic_write

            model = build_model(load_config(args.config_file, ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]))
            with atomic_write(args.weights) as f:
                torch.save({"model": model.state_dict()}, f)
    rows, ratios, same_files = [], {}, {}
    for n in args.sizes:
        folder = os.path.join(args.output, f"images_{n}")
        _make_folder(folder, n)
        for repeat in range(args.repeats):
            for variant in args.variants[:: 1 if repeat % 2 == 0 else -1]:
                out = os.path.join(args.output, f"labels_{n}_{variant}")
                # A fresh output each time: the figures are for labelling every image, not for a resumed run.
                subprocess.call(["rm", "-rf", out])
                cmd = [sys.executable, os.path.abspath(__file__), "--config-file", args.config_file, "--weights",
                       args.weights, "--threads", str(args.threads), "--child-folder", folder, "--child-output", out,
                       "--child-variant", variant]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"size {n} ({variant}) failed:\n{result.stderr[-3000:]}")
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"# {n} images, {variant}: {rows[-1]}", file=sys.stderr)
        if len(args.variants) == 2:
            speed = {v: statistics.median(r["label_images_per_s"] for r in rows if r["images"] == n
                                          and r["variant"] == v) for v in args.variants}
            ratios[n] = speed["now"] / speed["baseline"]
            same_files[n] = _same_label_files(*(os.path.join(args.output, f"labels_{n}_{v}") for v in args.variants))
    now_rows = [r for r in rows if r["variant"] == args.variants[0]]
    summary = {"rows": rows, "peak_ratio": now_rows[-1]["peak_rss_mb"] / now_rows[0]["peak_rss_mb"],
               "ratios": ratios, "same_files": same_files, "loadavg_1min": os.getloadavg()[0],
               "threads": args.threads}
    if args.json:
        print(json.dumps(summary))
        return
    print("| variant | images | label s | label CPU s | label img/s | index s | index img/s | centroids | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['images']} | {r['label_s']:.1f} | {r['label_cpu_s']:.1f} | "
              f"{r['label_images_per_s']:.1f} | "
              f"{r['index_s']:.1f} | {r['index_images_per_s']:.0f} | {r['centroids']} | {r['peak_rss_mb']:.0f} |")
    for n, ratio in ratios.items():
        print(f"{n} images: now / baseline label img/s {ratio:.2f}x (medians), "
              f"label files {'identical' if same_files[n] else 'DIFFERENT'}")
    print(f"peak memory {now_rows[-1]['images']} vs {now_rows[0]['images']} images: {summary['peak_ratio']:.2f}x "
          f"(loadavg {summary['loadavg_1min']:.1f}, {args.threads} torch threads)")


def _same_label_files(a, b):
    """Whether the two outputs hold the same label files, byte for byte."""
    names = {}
    for root in (a, b):
        names[root] = sorted(os.path.relpath(os.path.join(d, f), root)
                             for d, _, fs in os.walk(os.path.join(root, "labels")) for f in fs)
    return names[a] == names[b] and bool(names[a]) and all(
        filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in names[a])


def torch_threads_default():
    return int(os.environ.get("OMP_NUM_THREADS", "2"))


if __name__ == "__main__":
    main()
