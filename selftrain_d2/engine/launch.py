"""Shared command-line plumbing: argument parser, config set-up and (CPU or GPU) multi-process launch."""
import logging

import torch
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..data.datasets import register_from_cfg
from ..utils.onednn import set_primitive_cache_capacity

__all__ = ["default_argument_parser", "setup", "launch_from_args"]


def setup(args):
    """Merge the config, register config-defined datasets, and do Detectron2's default set-up.

    Called in every process, so registrations made from the config exist in each DDP worker.
    """
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("No GPU available: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    register_from_cfg(cfg)
    cfg.freeze()
    capacity = set_primitive_cache_capacity(cfg.ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    default_setup(cfg, args)
    # Detectron2 sets up its own and fvcore's loggers; ours log epoch plans, skipped images, etc.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="selftrain_d2", abbrev_name="st2")
    logging.getLogger(__name__).info("oneDNN primitive cache: %s entries", capacity or "default")
    return cfg


def launch_from_args(main, args):
    """Detectron2's ``launch``; without GPUs, ``--num-gpus N`` starts N CPU processes over gloo."""
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
