"""Train or evaluate any selftrain-d2 / Detectron2 model from a YAML config.

    python tools/train_net.py --config-file configs/demo/deeplabv3plus-effnetlite0.yaml
    python tools/train_net.py --config-file CFG --num-gpus 2            # 2 GPUs
    python tools/train_net.py --config-file CFG --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes (gloo)
    python tools/train_net.py --config-file CFG --num-gpus 8 --num-machines 2 --machine-rank R \
        --dist-url tcp://HOST_OF_RANK_0:PORT                            # on each of 2 machines, R = 0 and 1
    python tools/train_net.py --config-file CFG --resume                  # continue from last_checkpoint
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth

The trainer class is ``SELFTRAIN.TRAINER`` (e.g. ``SemiSupervisedTrainer`` for guided distillation).
"""
import sys

from selftrain_d2.cli import add_version_argument, launch_command
from selftrain_d2.engine import build_trainer_class, default_argument_parser, setup, write_results
from selftrain_d2.engine.checkpoint import Checkpointer

__all__ = ["main", "parse_args", "run"]


def parse_args(argv=None):
    return add_version_argument(default_argument_parser()).parse_args(argv)


def run(args):
    """One process's training (or evaluation with ``--eval-only``); what ``launch`` starts in each process."""
    cfg = setup(args)
    trainer_cls = build_trainer_class(cfg)
    if args.eval_only:
        # No training loader is built on this path.
        if hasattr(trainer_cls, "eval_only"):  # trainers whose checkpoints hold more than one model
            results = trainer_cls.eval_only(cfg, resume=args.resume)
        else:
            model = trainer_cls.build_model(cfg)
            Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            results = trainer_cls.test(cfg, model)
        write_results(cfg.OUTPUT_DIR, results, name="eval_metrics.json")
        return results
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv=None):
    return launch_command("train_net", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
