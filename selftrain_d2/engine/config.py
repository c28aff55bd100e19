"""Config keys of the engine: oneDNN's kernel cache, cross-domain weight loading, guided distillation's
semi-supervised trainer and the projects' own keys."""
from detectron2.config import CfgNode as CN

from ..config import register_config

__all__ = ["add_engine_config"]


@register_config
def add_engine_config(cfg):
    """Trainer-level keys: ONEDNN_PRIMITIVE_CACHE_CAPACITY, MODEL.CLASS_TRANSFER, SEMISUP.*, PROJECTS."""
    # Entries in oneDNN's cache of compiled CPU kernels (one per convolution, input shape and pass), set by
    # tools' setup() before the first convolution (selftrain_d2.utils.onednn). oneDNN's own 1024 thrashes
    # when a crop schedule trains on several shapes; 0 keeps oneDNN's default, and an
    # ONEDNN_PRIMITIVE_CACHE_CAPACITY environment variable wins over this.
    cfg.ONEDNN_PRIMITIVE_CACHE_CAPACITY = 4096

    # Cross-domain finetuning: class names of the checkpoint in MODEL.WEIGHTS, in its class order. When set,
    # and the run is not resuming, every tensor sized by those classes (+1 no-object row) is remapped by name
    # to the classes of DATASETS.TRAIN[0]; new classes keep their fresh init. [] = load as usual.
    cfg.MODEL.CLASS_TRANSFER = CN()
    cfg.MODEL.CLASS_TRANSFER.SOURCE_CLASSES = []

    # Unlabeled training datasets; each image gives a weak view (teacher) and a strong view (student).
    cfg.DATASETS.TRAIN_UNLABELED = ()
    ss = cfg.SEMISUP = CN()
    # "guided": burn-in learns from a fixed teacher's pseudo labels too; "plain": labeled-only burn-in.
    ss.MODE = "guided"
    # Iterations of burn-in; at this iteration the teacher takes the student's weights, then follows its EMA.
    ss.BURN_IN_ITERS = 1000
    # EMA decay of the teacher after burn-in (teacher <- d * teacher + (1 - d) * student, every step).
    ss.EMA_DECAY = 0.9996
    # lambda_u: weight of the unsupervised loss (student on strong views vs. the teacher's pseudo labels);
    # 2.0 as the reference code (its unsupervised losses are doubled; the paper names no value).
    ss.UNSUP_LOSS_WEIGHT = 2.0
    # Unlabeled images without pseudo objects: "no_object" (the reference): they stay in the unsupervised
    # loss and their queries learn "no object"; "zero_if_all_empty" (before issue 24): that loss is zeroed
    # in a process whose whole unlabeled batch is empty (a batch with some objects still trains on every image).
    ss.EMPTY_PSEUDO_LABELS = "no_object"
    # Unlabeled images per step, over all processes (like SOLVER.IMS_PER_BATCH).
    ss.UNLABELED_IMS_PER_BATCH = 16
    # An unlabeled batch is drawn at every iteration that is a multiple of this.
    ss.UNLABELED_PERIOD = 1
    # Mapper of the unlabeled images (a MAPPER_REGISTRY name giving "image" (weak) and "image_strong").
    ss.UNLABELED_MAPPER_NAME = "mask_former_instance_weak_strong"
    # The unlabeled stream's seed is mixed from the run seed and this offset (so it differs from the labeled one).
    ss.UNLABELED_SEED_OFFSET = 1
    # Model(s) evaluated by TEST.EVAL_PERIOD, after training and by --eval-only: STUDENT, TEACHER or BOTH.
    ss.EVAL_MODEL = "STUDENT"
    ss.TEACHER = CN()
    # Checkpoint of the fixed burn-in teacher (trained on the labeled split); needed in "guided" mode.
    ss.TEACHER.WEIGHTS = ""
    # Config of that teacher when its architecture differs from the student's ("" = the student's config).
    ss.TEACHER.CONFIG = ""
    pl = ss.ONLINE_PSEUDO_LABELS = CN()
    # "instance": per-object masks from the teacher's queries; "semantic": per-pixel class labels.
    pl.TARGETS = "instance"
    # Filters applied in order to each image's queries (selftrain_d2.teacher.filters.PSEUDO_FILTER_REGISTRY).
    # The reference's chain: no object, class probability, soft area at the mask head's resolution, then
    # binary masks (ours upsampled to the image before the threshold; the reference's stay at mask resolution).
    pl.FILTERS = ["drop_no_object", "class_confidence", "soft_mask_area", "binarize_masks"]
    # Minimum class probability of a pseudo object; semantic targets: minimum class share per pixel.
    pl.SCORE_THRESHOLD = 0.7
    # Per-class minimum class probabilities (one per class); [] uses SCORE_THRESHOLD for every class.
    pl.CLASS_THRESHOLDS = []
    # Mask foreground where sigmoid(mask logit) >= this.
    pl.MASK_THRESHOLD = 0.5
    # "min_mask_area" filter: pseudo objects with fewer binary mask pixels (at the input resolution) are dropped.
    pl.MIN_MASK_AREA = 5
    # "soft_mask_area" filter: kept when the sum of sigmoid(mask logit) over the mask head's low-resolution map
    # is above this (the reference's 5; about 80 input pixels at stride 4).
    pl.MIN_SOFT_MASK_AREA = 5.0
    # "mask_quality" filter: minimum mean foreground probability inside the binary mask.
    pl.MASK_QUALITY_THRESHOLD = 0.5
    sa = ss.STRONG_AUG = CN()
    # Colour jitter of the strong view: probability, then brightness / contrast / saturation factors in [1-s, 1+s].
    sa.COLOR_JITTER_PROB = 0.8
    sa.BRIGHTNESS = 0.4
    sa.CONTRAST = 0.4
    sa.SATURATION = 0.4
    # Hue shift of the colour jitter, in turns of the hue circle drawn from [-HUE, HUE] (the reference's 0.1);
    # the four jitter changes are applied in a random order, as torchvision's ColorJitter does.
    sa.HUE = 0.1
    # Probability of turning the strong view gray.
    sa.GRAYSCALE_PROB = 0.2
    # Gaussian blur of the strong view: probability and the range its sigma (pixels) is drawn from.
    sa.BLUR_PROB = 0.5
    sa.BLUR_SIGMA = (0.1, 2.0)
    # Random erasing (cutout) of the strong view: up to ERASE_COUNT boxes, each with probability ERASE_PROB,
    # covering a share of the image drawn from ERASE_SCALE with an aspect ratio from ERASE_RATIO, filled with noise.
    # Off (0.0) as in the reference code, where it is commented out (0.7 before issue 24).
    sa.ERASE_PROB = 0.0
    sa.ERASE_COUNT = 1
    sa.ERASE_SCALE = (0.02, 0.2)
    sa.ERASE_RATIO = (0.3, 3.3)

    # Settings of variants under projects/: any keys, declared by the project's own YAML files.
    cfg.PROJECTS = CN(new_allowed=True)
