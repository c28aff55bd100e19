"""Centroid index: per image and class, the centroids of the connected regions of a label map.

Built in one streaming pass over label PNGs: each map is read, reduced to a few centroids and dropped,
so memory grows with the number of regions kept, never with image size. Centroid sampling
(``selftrain_d2.data.samplers``) draws a class uniformly, then one of its centroids, and the mapper
crops around it.
"""
import logging
import os
import zipfile

import cv2
import numpy as np

from ..utils.io import atomic_write
from .image_io import UnreadableImageError, read_sem_seg

__all__ = [
    "CentroidIndex",
    "region_centroids",
    "build_centroid_index",
    "save_centroid_index",
    "load_centroid_index",
]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_ARRAYS = ("image", "cls", "y", "x", "files", "skipped", "meta")


def region_centroids(label, num_classes, min_area, ignore_label=255):
    """Centroids of the 8-connected regions of each class in an HxW label map.

    Returns a list of ``num_classes`` float64 arrays of shape (k, 2) holding (y, x) in pixels (the
    mean position of the region's pixels); regions of fewer than ``min_area`` pixels are dropped and
    ``ignore_label`` pixels belong to no class.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an HxW label map, got shape {label.shape}")
    out = [np.zeros((0, 2)) for _ in range(num_classes)]
    present = np.flatnonzero(np.bincount(label.ravel())) if label.dtype == np.uint8 else np.unique(label)
    for c in present:
        c = int(c)
        if c == ignore_label:
            continue
        if not 0 <= c < num_classes:
            raise ValueError(f"label map holds id {c} outside the {num_classes} classes (ignore {ignore_label})")
        mask = (label == c).astype(np.uint8)
        n, _, stats, centres = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.flatnonzero(stats[1:n, cv2.CC_STAT_AREA] >= min_area) + 1  # component 0 is the background
        out[c] = centres[keep][:, ::-1].astype(np.float64)  # OpenCV gives (x, y)
    return out


class CentroidIndex:
    """Centroids of many label maps in flat arrays, one row per region.

    ``image[i]`` indexes ``files`` (the label file of each image, in the order indexed), ``cls[i]`` is the
    region's class and ``(y[i], x[i])`` its centroid in the label map's pixels, rounded. ``skipped``
    lists the label files that could not be read (they have no rows).
    """

    def __init__(self, image, cls, y, x, files, *, num_classes, min_area, ignore_label=255, skipped=()):
        self.image = np.asarray(image, np.int32)
        self.cls = np.asarray(cls, np.uint16)
        coord_dtype = np.uint16 if max(_max(y), _max(x)) < 2**16 else np.int32
        self.y = np.asarray(y).astype(coord_dtype)
        self.x = np.asarray(x).astype(coord_dtype)
        self.files = [str(f) for f in files]
        self.skipped = [str(f) for f in skipped]
        self.num_classes = int(num_classes)
        self.min_area = int(min_area)
        self.ignore_label = int(ignore_label)
        if not len(self.image) == len(self.cls) == len(self.y) == len(self.x):
            raise ValueError("centroid index arrays image, cls, y, x differ in length")

    def __len__(self):
        return len(self.image)

    @property
    def num_images(self):
        return len(self.files)

    def class_counts(self):
        """Number of centroids of each class."""
        return np.bincount(self.cls, minlength=self.num_classes)

    def aligned_to(self, records, source="centroid index", dataset="the dataset"):
        """A copy whose ``image`` indexes ``records`` (dataset dicts) instead of ``files``.

        Images are matched by their ``sem_seg_file_name``. An indexed file missing from ``records``
        means the index is stale and raises a ValueError naming ``source``; records missing from the
        index are logged (they have no centroids, so centroid sampling never draws them).
        """
        position = {}
        for i, r in enumerate(records):
            if "sem_seg_file_name" in r:
                position.setdefault(_key(r["sem_seg_file_name"]), i)
        mapping = np.array([position.get(_key(f), -1) for f in self.files], np.int64)
        missing = np.flatnonzero(mapping < 0)
        if len(missing):
            raise ValueError(
                f"{source} lists {len(missing)} label files that are not in {dataset}, e.g. "
                f"{self.files[missing[0]]}: it was built for other labels; rebuild it"
            )
        unindexed = len(records) - len(set(mapping.tolist()))
        if unindexed:
            logger.warning(f"{unindexed} of the {len(records)} images of {dataset} are not in {source}: "
                           "centroid sampling never draws them")
        files = [r.get("sem_seg_file_name", r.get("file_name", "")) for r in records]
        return CentroidIndex(
            mapping[self.image] if len(self) else self.image, self.cls, self.y, self.x, files,
            num_classes=self.num_classes, min_area=self.min_area, ignore_label=self.ignore_label,
            skipped=self.skipped,
        )

    @staticmethod
    def concatenate(indexes):
        """One index over the images of ``indexes`` in turn (their ``image`` values shifted accordingly)."""
        indexes = list(indexes)
        if not indexes:
            raise ValueError("no centroid index to concatenate")
        first = indexes[0]
        for other in indexes[1:]:
            if other.num_classes != first.num_classes:
                raise ValueError(
                    f"centroid indexes of {first.num_classes} and {other.num_classes} classes cannot be joined"
                )
        offsets = np.cumsum([0] + [ix.num_images for ix in indexes[:-1]])
        return CentroidIndex(
            np.concatenate([ix.image.astype(np.int64) + o for ix, o in zip(indexes, offsets)]),
            np.concatenate([ix.cls for ix in indexes]),
            np.concatenate([ix.y.astype(np.int64) for ix in indexes]),
            np.concatenate([ix.x.astype(np.int64) for ix in indexes]),
            [f for ix in indexes for f in ix.files],
            num_classes=first.num_classes, min_area=first.min_area, ignore_label=first.ignore_label,
            skipped=[f for ix in indexes for f in ix.skipped],
        )


def _max(a):
    a = np.asarray(a)
    return int(a.max()) if a.size else 0


def _key(path):
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def build_centroid_index(records, num_classes, min_area, ignore_label=255):
    """The ``CentroidIndex`` of the ``sem_seg_file_name`` label maps of ``records``, in one pass.

    Unreadable label files are skipped, counted in a log line and listed in ``index.skipped``; a label
    map with ids outside the class list stops the pass (the class count is wrong, not the file).
    """
    image, cls, ys, xs, files, skipped = [], [], [], [], [], []
    for i, record in enumerate(records):
        path = record.get("sem_seg_file_name")
        if path is None:
            raise KeyError(f"record {i} ({record.get('file_name', '?')}) has no 'sem_seg_file_name' to index")
        files.append(path)
        try:
            label = read_sem_seg(path, num_classes, ignore_label)
        except UnreadableImageError as e:
            logger.warning(f"centroid index: skipping {e}")
            skipped.append(path)
            continue
        for c, centres in enumerate(region_centroids(label, num_classes, min_area, ignore_label)):
            if len(centres):
                rounded = np.rint(centres).astype(np.int64)
                image.append(np.full(len(centres), len(files) - 1, np.int64))
                cls.append(np.full(len(centres), c, np.int64))
                ys.append(rounded[:, 0])
                xs.append(rounded[:, 1])
    if skipped:
        logger.warning(f"centroid index: {len(skipped)} of {len(files)} label files were unreadable and skipped")
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    index = CentroidIndex(cat(image), cat(cls), cat(ys), cat(xs), files, num_classes=num_classes,
                          min_area=min_area, ignore_label=ignore_label, skipped=skipped)
    logger.info(f"centroid index: {len(index)} regions of >= {min_area} pixels in {len(files)} label maps")
    return index


def save_centroid_index(index, path):
    """Write ``index`` to ``path`` (.npz), atomically."""
    meta = np.array([_FORMAT_VERSION, index.num_classes, index.min_area, index.ignore_label], np.int64)
    with atomic_write(path, "wb") as f:
        np.savez_compressed(
            f, image=index.image, cls=index.cls, y=index.y, x=index.x, meta=meta,
            files=np.array(index.files, dtype=np.str_), skipped=np.array(index.skipped, dtype=np.str_),
        )


def load_centroid_index(path, num_classes=None):
    """Read an index written by ``save_centroid_index``; errors name the file. With ``num_classes``,
    the index must have been built for that many classes."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _ARRAYS if k not in data.files]
            if missing:
                raise ValueError(f"arrays {missing} are missing")
            arrays = {k: data[k] for k in _ARRAYS}
    except FileNotFoundError:
        raise FileNotFoundError(f"centroid index {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"centroid index {path} is unreadable or not a centroid index: {e}") from None
    version, n_cls, min_area, ignore = (int(v) for v in arrays["meta"])
    if version != _FORMAT_VERSION:
        raise ValueError(f"centroid index {path} has format version {version}; expected {_FORMAT_VERSION}")
    if num_classes is not None and n_cls != num_classes:
        raise ValueError(f"centroid index {path} was built for {n_cls} classes, but the model has {num_classes}")
    index = CentroidIndex(arrays["image"], arrays["cls"], arrays["y"], arrays["x"], arrays["files"].tolist(),
                          num_classes=n_cls, min_area=min_area, ignore_label=ignore,
                          skipped=arrays["skipped"].tolist())
    if len(index) and (index.image.min() < 0 or index.image.max() >= index.num_images or index.cls.max() >= n_cls):
        raise ValueError(f"centroid index {path} is inconsistent: image or class ids out of range")
    return index
