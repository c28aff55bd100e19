"""Shared command-line plumbing: argument parser, config set-up and (CPU or GPU) multi-process launch."""
import logging
import os

import torch
from detectron2.engine import default_argument_parser as _d2_default_argument_parser
from detectron2.engine import default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..data.datasets import register_from_cfg
from ..utils.onednn import set_primitive_cache_capacity

__all__ = ["default_argument_parser", "setup", "launch_from_args", "check_dist_options", "LaunchError"]

logger = logging.getLogger(__name__)


class LaunchError(ValueError):
    """Launch options that cannot work here; raised before any process is started."""


def default_argument_parser(epilog=None):
    """Detectron2's parser, with ``--dist-url auto`` (a free port) by default: Detectron2's default port is
    derived from the user id, so two runs of one user on one machine would collide."""
    parser = _d2_default_argument_parser(epilog)
    parser.set_defaults(dist_url="auto")
    return parser


def check_dist_options(num_machines, machine_rank, dist_url):
    """Raise ``LaunchError`` for machine options that Detectron2's ``launch`` would reject or hang on."""
    if num_machines < 1:
        raise LaunchError(f"--num-machines must be at least 1, got {num_machines}")
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"--machine-rank must be in [0, {num_machines - 1}] for --num-machines {num_machines}, "
                          f"got {machine_rank}")
    if num_machines > 1 and dist_url == "auto":
        raise LaunchError(
            f"--num-machines {num_machines} needs --dist-url tcp://HOST:PORT, the same on every machine: HOST the "
            "address of the machine with --machine-rank 0 as the others reach it, PORT a free port there. "
            "'--dist-url auto' only picks a free port on a single machine")


def _check_device(args):
    """``--num-gpus N`` without CUDA runs N CPU processes only when the config asks for the CPU itself."""
    world_size = args.num_gpus * args.num_machines
    if world_size <= 1:
        return None  # one process: setup() falls back from cuda to cpu with a warning
    device = load_config(args.config_file, args.opts).MODEL.DEVICE
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise LaunchError(
            f"--num-gpus {args.num_gpus}"
            + (f" x --num-machines {args.num_machines}" if args.num_machines > 1 else "")
            + f" asks for {world_size} processes, but this machine has no CUDA GPU and MODEL.DEVICE is {device!r}. "
            "To run them as CPU processes (DDP over gloo), set MODEL.DEVICE cpu explicitly (in the config or on "
            "the command line); with --num-gpus 1 a single process falls back to the CPU by itself")
    if device.startswith("cuda") and args.num_gpus > torch.cuda.device_count():
        raise LaunchError(f"--num-gpus {args.num_gpus} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def setup(args):
    """Merge the config, register config-defined datasets, and do Detectron2's default set-up.

    Called in every process, so registrations made from the config exist in each DDP worker.
    """
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("No GPU available: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    register_from_cfg(cfg)
    cfg.freeze()
    capacity = set_primitive_cache_capacity(cfg.ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    default_setup(cfg, args)
    # Detectron2 sets up its own and fvcore's loggers; ours log epoch plans, skipped images, etc.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="selftrain_d2", abbrev_name="st2")
    logger.info("oneDNN primitive cache: %s entries", capacity or "default")
    return cfg


def launch_from_args(main, args):
    """Detectron2's ``launch`` of ``main(args)`` on ``--num-gpus`` processes per machine, after checking the
    options (``LaunchError`` before anything starts). Several processes without CUDA need ``MODEL.DEVICE cpu``;
    with it they run on the CPU over gloo, on a machine with GPUs too."""
    check_dist_options(args.num_machines, args.machine_rank, args.dist_url)
    if _check_device(args) == "cpu" and torch.cuda.is_available():
        # Detectron2's workers choose NCCL whenever they see a GPU, and NCCL cannot reduce CPU tensors.
        logger.info("MODEL.DEVICE cpu: hiding the GPUs from the %d worker processes (gloo)", args.num_gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
