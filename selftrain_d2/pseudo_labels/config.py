"""Config keys of offline pseudo labelling (tools/generate_pseudo_labels.py)."""
from detectron2.config import CfgNode as CN

from ..config import register_config

__all__ = ["add_pseudo_labels_config"]


@register_config
def add_pseudo_labels_config(cfg):
    """OFFLINE_PSEUDO_LABELS.*: how a teacher's predictions become pseudo-label files."""
    # Offline pseudo labelling by a teacher (tools/generate_pseudo_labels.py, selftrain_d2.pseudo_labels).
    cfg.OFFLINE_PSEUDO_LABELS = CN()
    # "hard": train-id PNGs; "soft": the same PNGs plus the top-k class probabilities per pixel (.npz).
    cfg.OFFLINE_PSEUDO_LABELS.FORMAT = "hard"
    # Pixels whose top class probability is below this get the ignore label (255); 0.0 keeps every pixel.
    cfg.OFFLINE_PSEUDO_LABELS.THRESHOLD = 0.0
    # Also write each pixel's top class probability as a uint8 PNG (round(p * 255)).
    cfg.OFFLINE_PSEUDO_LABELS.SAVE_CONFIDENCE = False
    # Classes kept per pixel in soft labels.
    cfg.OFFLINE_PSEUDO_LABELS.SOFT_TOP_K = 3
    # Instance teachers: predictions scoring below this are dropped.
    cfg.OFFLINE_PSEUDO_LABELS.INSTANCE_SCORE_THRESHOLD = 0.5
    cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE = CN()
    # Semantic teachers: add to each class's log-probability an offset fitted so that the pseudo labels' class
    # shares match SHARES (thin classes a teacher under-predicts get pixels back; pseudo_labels/class_balance.py).
    cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.ENABLED = False
    # Target pixel share of each class (NUM_CLASSES numbers); empty: the shares in the labels of DATASETS.TRAIN.
    cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SHARES = []
    # Input images (evenly spaced) and random pixels of each whose probabilities the offsets are fitted on.
    cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_IMAGES = 100
    cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_PIXELS = 4096
    cfg.OFFLINE_PSEUDO_LABELS.TTA = CN()
    # Scales (multiples of the INPUT.MIN_SIZE_TEST-resized image) whose class probabilities are averaged.
    cfg.OFFLINE_PSEUDO_LABELS.TTA.SCALES = [1.0]
    # Also average the prediction for the horizontally mirrored image at every scale.
    cfg.OFFLINE_PSEUDO_LABELS.TTA.FLIP = False
    cfg.OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW = CN()
    # Predict large images window by window (overlaps averaged) instead of whole.
    cfg.OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.ENABLED = False
    # Window (height, width) and step between windows; a stride below the size makes windows overlap. Smaller
    # images are padded to a window. DeepLab heads with a fixed ASPP pool accept only inputs of INPUT.CROP.SIZE
    # (times an integer): use it as the window for them when TTA.SCALES holds scales other than 1.0.
    cfg.OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.SIZE = [512, 1024]
    cfg.OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.STRIDE = [384, 768]
