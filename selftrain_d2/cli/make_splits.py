"""Write label-fraction split files for a registered dataset (see datasets/README.md).

    python tools/make_splits.py --dataset coco_2017_train --preset coco --seeds 1 2 3
    python tools/make_splits.py --dataset cityscapes_fine_sem_seg_train --percent 5 10 --seeds 1
    python tools/make_splits.py --dataset my_coco --coco-json ann.json --image-root images/ --percent 10
    python tools/make_splits.py --dataset my_photos --image-folder /data/photos --percent 1
    python tools/make_splits.py --dataset mapillary_vistas_sem_seg_train --n-shot 10 --seeds 1 2 3

Each file is DIR/<dataset>/<percent>pct_seed<seed>.txt (e.g. 0.4pct_seed1.txt), or <n>shot_seed<seed>.txt for
--n-shot (every class in at least N images; reads every label map once); running again with the same
arguments rewrites identical files. Use one in a config with
DATASETS.SPLITS [["<new name>", "<dataset>", "<file>"]].
"""
import argparse
import os
import sys

from selftrain_d2.cli import add_version_argument

PRESETS = {
    "coco": (0.4, 1, 2, 5, 10),
    "cityscapes": (5, 10, 20, 30),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    p.add_argument("--dataset", required=True, help="name of a registered dataset (the base of the splits)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--percent", type=float, nargs="+", metavar="P", help="percents of labeled images, in (0, 100]")
    which.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="; ".join(f"{k}: {' '.join(str(x) for x in v)} %%" for k, v in sorted(PRESETS.items())),
    )
    which.add_argument(
        "--n-shot",
        type=int,
        metavar="N",
        help="semantic datasets: a subset where every class appears in at least N images (rarest classes first)",
    )
    p.add_argument("--min-pixels", type=int, default=1, help="--n-shot: pixels a class needs to count as shown")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], metavar="S", help="one split per seed (default: 1)")
    p.add_argument("--output-dir", default="datasets/splits", help="default: datasets/splits")
    reg = p.add_argument_group("register --dataset first (when it is not a registered dataset yet)")
    reg.add_argument("--coco-json", help="a COCO-format annotation file ...")
    reg.add_argument("--image-root", help="... and the folder its file names are relative to")
    reg.add_argument("--image-folder", help="a folder of images, searched recursively")
    args = p.parse_args(argv)
    if (args.coco_json is None) != (args.image_root is None):
        p.error("--coco-json and --image-root go together")
    if args.coco_json and args.image_folder:
        p.error("give either --coco-json/--image-root or --image-folder, not both")
    if args.n_shot is not None:
        if args.n_shot < 1:
            p.error(f"--n-shot {args.n_shot}: must be at least 1")
        args.percents = []
        args.seeds = list(dict.fromkeys(args.seeds))
        return args
    percents = args.percent if args.percent else PRESETS[args.preset]
    for pct in percents:
        if not 0 < pct <= 100:
            p.error(f"--percent {pct}: must be in (0, 100]")
    args.percents = list(dict.fromkeys(percents))  # keep order, drop repeats
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def main(argv=None):
    args = parse_args(argv)
    # The package's datasets (demo scenes, checked COCO / Cityscapes) are registered with its subsystems.
    from selftrain_d2 import register_all

    register_all()
    from detectron2.data import DatasetCatalog

    from selftrain_d2.data.datasets.checked_builtin import add_path_checks
    from selftrain_d2.data.datasets.image_folder import register_image_folder
    from selftrain_d2.data.datasets.splits import (
        format_percent,
        make_split,
        split_file_name,
        split_keys,
        write_split_file,
    )

    if args.coco_json:
        from detectron2.data.datasets import register_coco_instances

        if args.dataset in DatasetCatalog.list():
            sys.exit(f"make_splits: dataset {args.dataset!r} is registered already; drop --coco-json/--image-root.")
        register_coco_instances(args.dataset, {}, args.coco_json, args.image_root)
        add_path_checks(args.dataset)
    elif args.image_folder:
        register_image_folder(args.dataset, args.image_folder)
    if args.dataset not in DatasetCatalog.list():
        sys.exit(
            f"make_splits: dataset {args.dataset!r} is not registered. Give --coco-json/--image-root or "
            "--image-folder, or one of the registered names (see datasets/README.md)."
        )

    try:
        records = DatasetCatalog.get(args.dataset)
    except (FileNotFoundError, ValueError) as e:  # missing data, bad split file: the message says it all
        sys.exit(f"make_splits: {e}")
    try:
        ids = split_keys(records, args.dataset)
    except ValueError as e:
        sys.exit(f"make_splits: {e}")
    out_dir = os.path.join(args.output_dir, args.dataset)
    if args.n_shot is not None:
        return _write_n_shot(args, records, out_dir)
    for pct in args.percents:
        for seed in args.seeds:
            chosen = make_split(ids, pct, seed)
            header = {
                "dataset": args.dataset,
                "percent": format_percent(pct),
                "seed": seed,
                "count": len(chosen),
                "total": len(ids),
                "method": "sha256(seed:id) ranking, selftrain_d2.data.datasets.splits.make_split",
            }
            path = write_split_file(os.path.join(out_dir, split_file_name(pct, seed)), chosen, header)
            print(f"{path}: {len(chosen)} of {len(ids)} images ({header['percent']}%, seed {seed})")


def _write_n_shot(args, records, out_dir):
    from detectron2.data import MetadataCatalog

    from selftrain_d2.data.datasets.nshot import choose_n_shot, class_presence, n_shot_file_name
    from selftrain_d2.data.datasets.splits import write_split_file

    meta = MetadataCatalog.get(args.dataset)
    classes = meta.get("stuff_classes", None)
    if not classes:
        sys.exit(f"make_splits: --n-shot needs a semantic dataset; {args.dataset!r} has no stuff_classes metadata.")
    try:
        presence = class_presence(records, len(classes), meta.get("ignore_label", 255), args.min_pixels)
    except (OSError, ValueError) as e:  # unreadable or foreign label map, unlabeled dataset: named in the message
        sys.exit(f"make_splits: {e}")
    for seed in args.seeds:
        chosen, short = choose_n_shot(presence, args.n_shot, seed, num_classes=len(classes))
        header = {
            "dataset": args.dataset,
            "n_shot": args.n_shot,
            "seed": seed,
            "count": len(chosen),
            "total": len(records),
            "min_pixels": args.min_pixels,
            "method": "rarest class first, sha256(seed:id) ranking, selftrain_d2.data.datasets.nshot.choose_n_shot",
        }
        if short:
            header["short_classes"] = ", ".join(f"{classes[c]}={k}" for c, k in short.items())
        path = write_split_file(os.path.join(out_dir, n_shot_file_name(args.n_shot, seed)), chosen, header)
        print(f"{path}: {len(chosen)} of {len(records)} images, every class in >= {args.n_shot} (seed {seed})")
        for c, k in short.items():
            print(f"  class {classes[c]!r} appears in only {k} image(s): all taken")


if __name__ == "__main__":
    sys.exit(main())
