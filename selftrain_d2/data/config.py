"""The data layer's config keys: datasets registered by config, mappers and augmentation, the student's epoch
(real / pseudo samples, centroid sampling, soft labels) and crop-size schedules."""
from detectron2.config import CfgNode as CN

from ..config import register_config

__all__ = ["add_data_config"]


@register_config
def add_data_config(cfg):
    """Dataset, mapper, loader and crop-schedule keys."""
    # Which registered dataset mapper builds training / test inputs (selftrain_d2.data.mappers).
    cfg.INPUT.DATASET_MAPPER_NAME = "semantic"
    # Random horizontal flip for the semantic mapper during training.
    cfg.INPUT.RANDOM_FLIP = "horizontal"

    # Label-fraction splits registered as datasets: [[NEW_NAME, BASE_DATASET, SPLIT_FILE], ...].
    # NEW_NAME holds the images listed in SPLIT_FILE, NEW_NAME + "_unlabeled" the rest, without labels.
    cfg.DATASETS.SPLITS = []
    # Folders of unlabeled images (searched recursively) registered as datasets: [[NAME, FOLDER], ...].
    cfg.DATASETS.IMAGE_FOLDERS = []

    # Output folders of tools/generate_pseudo_labels.py registered as training datasets: [[NAME, DIR], ...].
    cfg.DATASETS.PSEUDO_LABEL_FOLDERS = []
    # COCO-format instance datasets (Detectron2's register_coco_instances): [[NAME, JSON_FILE, IMAGE_ROOT], ...].
    cfg.DATASETS.COCO_INSTANCES = []
    # Image + label-map folders: [[NAME, IMAGE_DIR, LABEL_DIR, CLASSES(, IGNORE_LABEL)]]; CLASSES a list or .txt file.
    cfg.DATASETS.SEM_SEG = []
    # Semantic twins of COCO datasets, masks rasterised to ids (0 = background): [[NAME, COCO_NAME(, LABEL_DIR)]].
    cfg.DATASETS.SEM_SEG_FROM_COCO = []
    # Held-out labels of an unlabelled dataset (scores pseudo labels): [[DATASET, LABELED_DATASET or LABEL_DIR]].
    cfg.DATASETS.HELDOUT = []

    # Training loader: unreadable images are skipped and reported instead of stopping the run.
    cfg.DATALOADER.SKIP_UNREADABLE = True
    # Decoded training images and label maps kept in memory per loader process (semantic mapper), in MiB;
    # 0: decode every time. Worth it when the labeled split fits: it is read again every epoch.
    cfg.DATALOADER.DECODE_CACHE_MB = 0

    # Student training on real + pseudo labels (selftrain_d2.data.samplers): pseudo-labelled datasets
    # mixed into every epoch beside DATASETS.TRAIN (the real labels).
    cfg.DATASETS.TRAIN_PSEUDO = ()
    # Pseudo samples per real sample per epoch (the paper's 1:1 ... 7:1 is 1.0 ... 7.0).
    cfg.DATALOADER.PSEUDO_RATIO = 1.0
    # Each real image appears this many times per epoch (the duplicate-real-labels baseline when > 1).
    cfg.DATALOADER.REAL_REPEAT = 1
    # Share of the real images drawn per epoch (cycling, so each is drawn once before any repeats): the paper's
    # epoch is 0.5 (1.5K of 3K) + PSEUDO_RATIO x as many pseudo samples; its duplicate-real baseline at ratio x
    # keeps 0.5 with REAL_REPEAT 1 + x and no pseudo labels (the same epoch length). 1.0: every real image.
    cfg.DATALOADER.REAL_FRACTION = 1.0
    # Pseudo-labelled datasets of DATASETS.TRAIN_PSEUDO trained on their soft labels (OFFLINE_PSEUDO_LABELS.FORMAT soft:
    # the teacher's top-k probabilities, soft cross-entropy); the others train on their hard labels.
    cfg.DATASETS.TRAIN_PSEUDO_SOFT = ()
    # Soft labels: pixels whose stored top-k probability mass is below this are ignored (besides those the hard
    # label ignores); the stored probabilities are renormalised to sum to 1.
    cfg.DATALOADER.SOFT_LABEL_MIN_MASS = 0.0
    cfg.DATALOADER.CENTROID_SAMPLING = CN()
    # Draw samples by a class uniformly, then one of its region centroids, and crop around it.
    cfg.DATALOADER.CENTROID_SAMPLING.ENABLED = False
    # Connected regions smaller than this many pixels get no centroid.
    cfg.DATALOADER.CENTROID_SAMPLING.MIN_AREA = 16
    # The crop centre moves by up to this fraction of the crop size (uniformly) from the centroid; < 0.5.
    cfg.DATALOADER.CENTROID_SAMPLING.JITTER = 0.2
    # "pseudo": only the pseudo samples are drawn by centroid; "all": the real samples too.
    cfg.DATALOADER.CENTROID_SAMPLING.APPLY_TO = "pseudo"
    # Saved centroid indexes, [[DATASET_NAME, FILE.npz], ...]; a dataset without one is indexed at loader start.
    cfg.DATALOADER.CENTROID_SAMPLING.INDEX_FILES = []
    # Training colour jitter: brightness, contrast and saturation factors drawn from [1 - s, 1 + s]; 0 = off.
    cfg.INPUT.COLOR_JITTER = 0.0
    # Training Gaussian blur: probability per image (0 = off), and the range its sigma is drawn from.
    cfg.INPUT.GAUSSIAN_BLUR = 0.0
    cfg.INPUT.GAUSSIAN_BLUR_SIGMA = (0.1, 2.0)

    # Crop-size schedules (selftrain_d2.data.crop_schedules; self-training paper section 3.3).
    cfg.INPUT.CROP_SCHEDULE = CN()
    # Train each epoch at the crop the schedule gives, with the batch scaled to keep pixels per batch.
    cfg.INPUT.CROP_SCHEDULE.ENABLED = False
    # constant, coarse2fine, fine2coarse (crop changes every PERIOD epochs), coarse2fine+, fine2coarse+ (every epoch).
    cfg.INPUT.CROP_SCHEDULE.NAME = "coarse2fine+"
    # Crops as scales of INPUT.CROP.SIZE (the largest crop); 0.5..1.0 is the paper's 400..800 at an 800 crop.
    cfg.INPUT.CROP_SCHEDULE.SCALES = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # Epochs per crop for coarse2fine / fine2coarse; 0 shares the epochs evenly among the crops.
    cfg.INPUT.CROP_SCHEDULE.PERIOD = 0
    # First epochs at the largest crop before the schedule starts (the paper's crop-size warm-up).
    cfg.INPUT.CROP_SCHEDULE.WARMUP_EPOCHS = 0
    # Largest batch (all processes) a small crop may get; SOLVER.IMS_PER_BATCH is the batch at the largest crop.
    cfg.INPUT.CROP_SCHEDULE.MAX_BATCH = 64
    # How the learning rate follows the batch: "none" (the paper names no rule), "linear" or "sqrt".
    cfg.INPUT.CROP_SCHEDULE.LR_SCALING = "none"
    # Epochs of training; 0 = the images SOLVER.MAX_ITER x IMS_PER_BATCH make (MAX_ITER is then recomputed).
    cfg.INPUT.CROP_SCHEDULE.EPOCHS = 0
    # Scaled crop sides are rounded to a multiple of this; 1 = exact scales (the paper's 400, 480 ... 800 at an 800
    # crop). The model's padding multiple (32) spends no compute on padding, but gives 384, 480, 576 ... at 800.
    cfg.INPUT.CROP_SCHEDULE.SIZE_DIVISIBILITY = 1

    cfg.INPUT.COLOR_AUG_SSD = False  # photometric distortion (SSD-style) in the Mask2Former mappers
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # pad images and labels in the mapper to this multiple (-1: no)
    cfg.INPUT.IMAGE_SIZE = 1024  # large-scale-jitter (LSJ) output size, instance mapper
    cfg.INPUT.MIN_SCALE = 0.1  # LSJ scale range
    cfg.INPUT.MAX_SCALE = 2.0
