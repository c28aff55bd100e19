"""N-shot splits: a seeded subset of a labeled semantic-segmentation dataset in which every class appears in at
least N images (the paper's "10 samples per class" cross-domain setting).

:func:`choose_n_shot` is pure: it takes, per image id, the classes its label map shows, and picks greedily,
rarest class first (fewest images showing it; ties by class id). For each class it counts the images
already chosen that show it and adds the missing ones, taking the class's not-yet-chosen images in the
order of the SHA-256 of ``"<seed>:<id>"`` (the ranking :mod:`.splits` uses), so the result depends only on
the presence table, N and the seed. Classes shown by fewer than N images get all of them and are reported.
The chosen ids go to a split file of the usual format (:func:`.splits.write_split_file`) and register
through ``DATASETS.SPLITS`` like any other split.
"""
import hashlib
import numbers

import numpy as np

from ..image_io import read_sem_seg
from ..records import image_key

__all__ = ["choose_n_shot", "class_presence", "n_shot_file_name"]


def _rank(seed, image_id):
    return hashlib.sha256(f"{seed}:{image_id}".encode("utf-8")).digest()


def choose_n_shot(presence, n, seed, num_classes=None):
    """Greedy N-shot selection.

    ``presence``: ``{image id: iterable of class ids shown}``. ``n``: wanted images per class (>= 1).
    ``num_classes``: classes to cover are ``0..num_classes-1`` (default: every class some image shows).
    Returns ``(chosen, short)``: the chosen ids sorted as strings, and ``{class id: images available}`` for the
    classes shown by fewer than ``n`` images (0 for a class no image shows).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    shows = {str(i): {int(c) for c in cs} for i, cs in presence.items()}
    if len(shows) != len(presence):
        raise ValueError("image ids must stay unique as strings")
    by_class = {}
    for image_id, classes in shows.items():
        for c in classes:
            by_class.setdefault(c, []).append(image_id)
    classes = range(num_classes) if num_classes is not None else sorted(by_class)
    chosen = set()
    short = {}
    for c in sorted(classes, key=lambda c: (len(by_class.get(c, ())), c)):
        images = by_class.get(c, [])
        if len(images) < n:
            short[c] = len(images)
        need = n - sum(1 for i in images if i in chosen)
        if need <= 0:
            continue
        candidates = sorted((i for i in images if i not in chosen), key=lambda i: _rank(seed, i))
        chosen.update(candidates[:need])
    return sorted(chosen), dict(sorted(short.items()))


def class_presence(records, num_classes, ignore_label=255, min_pixels=1):
    """``{image key: sorted class ids with at least min_pixels pixels}`` from the records' label maps.

    Every record needs ``sem_seg_file_name``; ids outside the classes fail with the file's name.
    """
    presence = {}
    for r in records:
        if "sem_seg_file_name" not in r:
            raise ValueError(
                f"record of {r.get('file_name', '?')} has no sem_seg_file_name: an N-shot split needs a labeled "
                "semantic-segmentation dataset"
            )
        label = read_sem_seg(r["sem_seg_file_name"], num_classes, ignore_label)
        counts = np.bincount(label[label != ignore_label].ravel(), minlength=num_classes)
        presence[image_key(r)] = [int(c) for c in np.flatnonzero(counts >= min_pixels)]
    return presence


def n_shot_file_name(n, seed):
    """``<n>shot_seed<seed>.txt``, e.g. ``10shot_seed1.txt``."""
    return f"{int(n)}shot_seed{seed}.txt"
