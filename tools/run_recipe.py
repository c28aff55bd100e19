#!/usr/bin/env python
"""Run a whole recipe (teacher -> pseudo labels -> centroid index -> student -> evaluation) in one command.

    python tools/run_recipe.py --config-file configs/demo/self-training.yaml --output output/self-training
    python tools/run_recipe.py --config-file RECIPE --output DIR SEED 3     # KEY VALUE pairs go to every stage
    python tools/run_recipe.py --config-file RECIPE --output DIR --num-gpus 2

Each stage runs in DIR/<stage>/ and is skipped when its inputs have not changed; rerun the same command
after a kill to resume. DIR/summary.json holds every evaluated stage's results, DIR/report.md the report.
"""
import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from selftrain_d2.recipe import RecipeError, load_recipe, run_recipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="recipe YAML file")
    parser.add_argument("--output", default=None, help="output folder (default: output/<recipe name>)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per training / labelling stage")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and its figures")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every stage")
    args = parser.parse_args(argv)
    setup_logger(name="selftrain_d2")
    try:
        recipe = load_recipe(args.config_file)
        output = args.output or os.path.join("output", recipe.name)
        summary = run_recipe(recipe, output, opts=args.opts, num_gpus=args.num_gpus, report=not args.no_report)
    except RecipeError as e:
        logging.getLogger("selftrain_d2").error("%s", e)
        return 1
    print(f"Recipe {recipe.name}: results in {os.path.abspath(output)}/summary.json, report in "
          f"{os.path.abspath(output)}/report.md")
    for stage, results in summary.items():
        headline = {task: {k: round(v, 2) for k, v in m.items() if k in ("mIoU", "AP", "pACC")}
                    for task, m in results.items() if isinstance(m, dict)}
        print(f"  {stage}: {headline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
