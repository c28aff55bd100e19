"""Reading images and label maps with errors that name the file and what is wrong with it, optionally
through a ``DecodeCache`` that keeps decoded arrays in memory."""
from collections import OrderedDict

import numpy as np
from detectron2.data import detection_utils as d2_utils
from detectron2.utils.file_io import PathManager
from PIL import Image, UnidentifiedImageError

__all__ = [
    "UnreadableImageError", "LabelValueError", "DecodeCache", "read_image", "read_sem_seg", "read_label_map",
    "invalid_label_ids", "check_label_ids",
]


class UnreadableImageError(OSError):
    """An image or label file that is missing, truncated or not an image."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = str(reason)


class LabelValueError(ValueError):
    """A label map holding ids outside the class list."""


# PIL modes of 16-bit grey images. PIL converts them to "L" / "RGB" by clipping at 255, so a 16-bit PNG came
# out white; 16-bit colour PNGs and TIFFs PIL already reads as 8-bit RGB(A) (the high bytes).
_GREY_16 = ("I;16", "I;16B", "I;16L", "I;16N")
_HIGH_DEPTH = (*_GREY_16, "I", "F")


def _to_8bit(image, path):
    """A high-depth grey PIL image scaled to 8-bit "L" (0..65535 -> 0..255, rounded)."""
    # Older Pillow reads 16-bit grey PNGs as 32-bit "I"; a PNG holds at most 16 bits.
    if image.mode in _GREY_16 or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.uint32).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    raise UnreadableImageError(
        path, f"PIL mode {image.mode!r} ({'floating point' if image.mode == 'F' else '32-bit integer'} values) has "
        "no known range to scale to 8 bits; save it as an 8- or 16-bit image")


def _read(path, fmt):
    """Detectron2's read_image, except that high-depth images are scaled to 8 bits (or refused) when ``fmt``
    asks for an image; label maps (``fmt`` None) keep their integer values."""
    try:
        with PathManager.open(path, "rb") as f:
            image = d2_utils._apply_exif_orientation(Image.open(f))
            if fmt is not None and image.mode in _HIGH_DEPTH:
                image = _to_8bit(image, path)
            return d2_utils.convert_PIL_to_numpy(image, fmt)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        if isinstance(e, UnreadableImageError):
            raise
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


def read_label_map(path):
    """A single-channel label map with its stored integer values (8- or 16-bit PNGs are not scaled), unchecked."""
    label = _read(path, None)
    if label.ndim == 3:
        if label.shape[2] != 1:
            raise LabelValueError(
                f"label map {path} has {label.shape[2]} channels; expected a single-channel PNG of train ids"
            )
        label = label[:, :, 0]
    return label


def invalid_label_ids(label, num_classes, ignore_label=255):
    """Bool map of the pixels whose id is neither a class id in [0, num_classes) nor ``ignore_label``."""
    bad = (label >= num_classes) & (label != ignore_label)
    if np.issubdtype(label.dtype, np.signedinteger):
        bad |= label < 0
    return bad


def check_label_ids(label, path, num_classes, ignore_label=255):
    """Raise ``LabelValueError`` naming ``path`` and the ids when ``label`` holds ids outside the classes."""
    bad = invalid_label_ids(label, num_classes, ignore_label)
    if bad.any():
        values = sorted(int(v) for v in np.unique(label[bad]))
        raise LabelValueError(
            f"label map {path} holds ids {values[:10]} outside the {num_classes} classes "
            f"(valid: 0..{num_classes - 1} and ignore {ignore_label})"
        )


def read_sem_seg(path, num_classes, ignore_label=255, cache=None):
    """A label map of train ids; every value must be a class id in [0, num_classes) or ``ignore_label``.
    Checked once when it goes through ``cache``, and read-only from it."""
    if cache is not None:
        return cache.get(("sem_seg", str(path), num_classes, ignore_label),
                         lambda: read_sem_seg(path, num_classes, ignore_label))
    label = read_label_map(path)
    check_label_ids(label, path, num_classes, ignore_label)
    if label.dtype != np.uint8 and num_classes <= 256 and 0 <= ignore_label <= 255:
        # 16-bit label PNGs: the checked ids fit 8 bits, and Detectron2's resize handles only 8-bit label maps.
        label = label.astype(np.uint8)
    return label


Image.MAX_IMAGE_PIXELS = None  # Large street-scene panoramas are legitimate inputs.
