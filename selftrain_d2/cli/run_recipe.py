"""Run a whole recipe (teacher -> pseudo labels -> centroid index -> student -> evaluation) in one command.

    python tools/run_recipe.py --config-file configs/demo/self-training.yaml --output output/self-training
    python tools/run_recipe.py --config-file RECIPE --output DIR SEED 3     # KEY VALUE pairs go to every stage
    python tools/run_recipe.py --config-file RECIPE --output DIR --num-gpus 2
    python tools/run_recipe.py --config-file RECIPE --output SHARED_DIR --num-gpus 8 --num-machines 2 \
        --machine-rank R --dist-url tcp://HOST_OF_RANK_0:PORT          # on each of 2 machines, R = 0 and 1

Each stage runs in DIR/<stage>/ and is skipped when its inputs have not changed; rerun the same command
after a kill to resume. DIR/summary.json holds every evaluated stage's results, DIR/report.md the report.

Across machines, start the same command on every machine with its --machine-rank and one --dist-url (every
stage uses it in turn), on an output folder that all machines share (network filesystem): training,
labelling and evaluation stages run on all machines together; machine rank 0 alone keeps the stage records,
builds the centroid indexes and writes summary.json and report.md, and the other machines wait for its
record of each stage before the next one.
"""
import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from selftrain_d2.cli import add_version_argument
from selftrain_d2.orchestration.recipe import RecipeError, load_recipe, run_recipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("--config-file", required=True, help="recipe YAML file")
    parser.add_argument("--output", default=None, help="output folder (default: output/<recipe name>)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine of each training / "
                        "labelling stage (with MODEL.DEVICE cpu: CPU processes)")
    parser.add_argument("--num-machines", type=int, default=1, help="machines that run the recipe together")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank (0: keeps the records)")
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine rank 0 for every stage; "
                        "auto (one machine only): a free port per stage")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and its figures")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every stage")
    args = parser.parse_args(argv)
    setup_logger(name="selftrain_d2")
    try:
        recipe = load_recipe(args.config_file)
        output = args.output or os.path.join("output", recipe.name)
        summary = run_recipe(recipe, output, opts=args.opts, num_gpus=args.num_gpus, report=not args.no_report,
                             num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url)
    except RecipeError as e:
        logging.getLogger("selftrain_d2").error("%s", e)
        return 1
    if args.machine_rank > 0:
        print(f"Recipe {recipe.name}: machine rank {args.machine_rank} done; machine rank 0 writes the summary and "
              f"report in {os.path.abspath(output)}")
        return 0
    print(f"Recipe {recipe.name}: results in {os.path.abspath(output)}/summary.json, report in "
          f"{os.path.abspath(output)}/report.md")
    for stage, results in summary.items():
        headline = {task: {k: round(v, 2) for k, v in m.items() if k in ("mIoU", "AP", "pACC")}
                    for task, m in results.items() if isinstance(m, dict)}
        print(f"  {stage}: {headline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
