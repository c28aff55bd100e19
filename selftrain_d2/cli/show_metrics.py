"""Print the evaluation results a training run saved (OUTPUT_DIR/final_metrics.json).

    python tools/show_metrics.py output/demo/deeplabv3plus-effnetlite0
"""
import argparse
import json
import os
import sys

from selftrain_d2.cli import add_version_argument


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("output_dir")
    parser.add_argument("--file", default="final_metrics.json")
    args = parser.parse_args(argv)
    path = os.path.join(args.output_dir, args.file)
    if not os.path.isfile(path):
        sys.exit(f"no results at {path}: did training finish with DATASETS.TEST set?")
    results = json.load(open(path))
    for task, metrics in results.items():
        if task == "sem_seg":
            per_class = {k[4:]: v for k, v in metrics.items() if k.startswith("IoU-")}
            print(f"Semantic segmentation ({path}):")
            for name, iou in per_class.items():
                print(f"  IoU {name:<16s} {iou:6.2f}")
            print(f"  mIoU {metrics['mIoU']:.2f}  pixel accuracy {metrics['pACC']:.2f}  "
                  f"(chance: guessing one of {len(per_class)} classes uniformly scores mIoU < {100 / len(per_class):.1f})")
        else:
            summary = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "-" not in k)
            print(f"{task}: {summary}")


    return 0


if __name__ == "__main__":
    sys.exit(main())
