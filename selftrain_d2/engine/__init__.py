from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from ..utils.registry import NamedRegistry
from .ddp import unwrap_ddp, wrap_ddp
from .hooks import StepSeeder
from .launch import default_argument_parser, launch_from_args, setup
from .trainer import Trainer, write_results

# Trainer classes by name: tools/train_net.py runs cfg.SELFTRAIN.TRAINER.
TRAINER_REGISTRY = NamedRegistry("TRAINER")
TRAINER_REGISTRY.__doc__ = "Trainer classes (DefaultTrainer subclasses built from cfg), chosen by SELFTRAIN.TRAINER."
TRAINER_REGISTRY.register(Trainer)

from .semisup import SemiSupervisedTrainer  # noqa: E402

TRAINER_REGISTRY.register(SemiSupervisedTrainer)


def build_trainer_class(cfg):
    """The trainer class named by ``cfg.SELFTRAIN.TRAINER``."""
    name = cfg.SELFTRAIN.TRAINER
    if name not in TRAINER_REGISTRY:
        raise KeyError(f"SELFTRAIN.TRAINER: no trainer {name!r}; registered: {sorted(k for k, _ in TRAINER_REGISTRY)}")
    return TRAINER_REGISTRY.get(name)


__all__ = [
    "Trainer", "StepSeeder", "wrap_ddp", "unwrap_ddp", "setup", "default_argument_parser",
    "launch_from_args", "write_results", "TRAINER_REGISTRY", "build_trainer_class", "SemiSupervisedTrainer",
]
