"""Reading images and label maps with errors that name the file and what is wrong with it."""
import numpy as np
from detectron2.data import detection_utils as d2_utils
from PIL import Image, UnidentifiedImageError

__all__ = ["UnreadableImageError", "LabelValueError", "read_image", "read_sem_seg"]


class UnreadableImageError(OSError):
    """An image or label file that is missing, truncated or not an image."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = str(reason)


class LabelValueError(ValueError):
    """A label map holding ids outside the class list."""


def _read(path, fmt):
    try:
        return d2_utils.read_image(path, format=fmt)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        # PIL reports truncated files as OSError("image file is truncated ..."), missing ones as
        # FileNotFoundError and non-images as UnidentifiedImageError.
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def read_image(path, fmt="BGR"):
    """An HWC uint8 image in ``fmt`` (a PIL mode, or "BGR")."""
    return _read(path, fmt)


def read_sem_seg(path, num_classes, ignore_label=255):
    """A label map of train ids; every value must be a class id in [0, num_classes) or ``ignore_label``."""
    label = _read(path, None)
    if label.ndim == 3:
        if label.shape[2] != 1:
            raise LabelValueError(
                f"label map {path} has {label.shape[2]} channels; expected a single-channel PNG of train ids"
            )
        label = label[:, :, 0]
    bad = (label >= num_classes) & (label != ignore_label)
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad]))
        raise LabelValueError(
            f"label map {path} holds ids {values[:10]} outside the {num_classes} classes "
            f"(valid: 0..{num_classes - 1} and ignore {ignore_label})"
        )
    return label


Image.MAX_IMAGE_PIXELS = None  # Large street-scene panoramas are legitimate inputs.
