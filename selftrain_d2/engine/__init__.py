from .ddp import unwrap_ddp, wrap_ddp
from .hooks import StepSeeder
from .launch import default_argument_parser, launch_from_args, setup
from .trainer import Trainer, write_results

__all__ = [
    "Trainer", "StepSeeder", "wrap_ddp", "unwrap_ddp", "setup", "default_argument_parser",
    "launch_from_args", "write_results",
]
