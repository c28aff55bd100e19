"""Reading images and label maps with errors that name the file and what is wrong with it, optionally
through a ``DecodeCache`` that keeps decoded arrays in memory."""
from collections import OrderedDict

import numpy as np
from detectron2.data import detection_utils as d2_utils
from PIL import Image, UnidentifiedImageError

__all__ = ["UnreadableImageError", "LabelValueError", "DecodeCache", "read_image", "read_sem_seg"]


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


class DecodeCache:
    """Decoded arrays by key, the least recently used dropped first once they hold more than
    ``capacity_bytes``; 0 keeps nothing.

    A labeled split of a few hundred images is read again every epoch (and REAL_REPEAT times within one),
    and decoding is about half of the mapper's time on small images. Cached arrays are read-only, so a
    transform that would write into one fails instead of corrupting later epochs. Each loader process has
    its own cache: NUM_WORKERS workers hold up to NUM_WORKERS x the capacity.
    """

    def __init__(self, capacity_bytes):
        self.capacity = max(0, int(capacity_bytes))
        self._items = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self):
        return len(self._items)

    def get(self, key, load):
        """The array cached under ``key``, or ``load()``'s result (cached when it fits)."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return value
        self.misses += 1
        value = load()
        if self.capacity and value.nbytes <= self.capacity:
            value.setflags(write=False)
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.capacity:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
        return value


def read_image(path, fmt="BGR", cache=None):
    """An HWC uint8 image in ``fmt`` (a PIL mode, or "BGR"); read-only when it comes from ``cache``."""
    if cache is not None:
        return cache.get(("image", str(path), fmt), lambda: _read(path, fmt))
    return _read(path, fmt)


def read_sem_seg(path, num_classes, ignore_label=255, cache=None):
    """A label map of train ids; every value must be a class id in [0, num_classes) or ``ignore_label``.
    Checked once when it goes through ``cache``, and read-only from it."""
    if cache is not None:
        return cache.get(("sem_seg", str(path), num_classes, ignore_label),
                         lambda: read_sem_seg(path, num_classes, ignore_label))
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
