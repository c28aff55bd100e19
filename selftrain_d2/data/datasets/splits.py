"""Label-fraction splits: choose a reproducible subset of a dataset's images and register it.

A split file is plain text, one image id per line (the id :func:`selftrain_d2.data.records.image_key` gives a
dataset dict; where those repeat within a dataset, the file name, see :func:`split_keys`), after optional
``# key: value`` header lines::

    # dataset: coco_2017_train
    # percent: 1
    # seed: 1
    # count: 1183
    # total: 118287
    100008
    100022
    ...

How a subset is chosen (:func:`make_split`): every id is ranked by the SHA-256 of ``"<seed>:<id>"`` and the
``round(n * percent / 100)`` lowest (at least 1) are kept. This depends only on the set of ids, the percent and
the seed: not on the input order, the Python or numpy version, or the platform. For one seed, a smaller
percent gives a subset of a larger one (1% inside 2% inside 5% ...), so fractions are nested.

:func:`register_split` registers ``NEW`` (the listed images, with their labels) and ``NEW_unlabeled`` (every
other image of the base dataset, labels removed). Both read the split file and the base dataset only when they
are loaded.
"""
import hashlib
import numbers
import os
from collections import Counter
from decimal import Decimal
from fractions import Fraction

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...utils.io import atomic_write_text
from ..records import image_key
from .register import expand_path, register_once

__all__ = [
    "LABEL_KEYS",
    "UNLABELED_SUFFIX",
    "format_percent",
    "make_split",
    "read_split_file",
    "read_split_header",
    "register_split",
    "split_count",
    "split_file_name",
    "split_keys",
    "write_split_file",
]

UNLABELED_SUFFIX = "_unlabeled"
# Keys removed from the records of the unlabeled part.
LABEL_KEYS = ("annotations", "sem_seg_file_name", "pan_seg_file_name", "segments_info")
_SHOWN = 5


def _check_percent(percent):
    if isinstance(percent, bool) or not isinstance(percent, (numbers.Real, Decimal)):
        raise TypeError(f"percent must be a number, got {percent!r}")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")


def split_count(n, percent):
    """How many of ``n`` images a ``percent`` split keeps: ``round(n * percent / 100)``, at least 1.

    Computed exactly (``percent`` taken as its shortest decimal form, so 0.4 is 2/5), with Python's
    ``round`` (halves go to the even neighbour).
    """
    _check_percent(percent)
    if n < 1:
        raise ValueError("cannot split an empty list of ids")
    exact = Fraction(n) * Fraction(str(percent)) / 100
    return min(n, max(1, round(exact)))


def _rank(seed, image_id):
    return hashlib.sha256(f"{seed}:{image_id}".encode("utf-8")).digest()


def make_split(ids, percent, seed):
    """The ids kept by a ``percent`` % split with ``seed``, sorted (as strings).

    ``ids``: the image ids of the whole dataset (converted to ``str``; duplicates are an error).
    Same set of ids, percent and seed give the same subset, whatever the input order.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    ids = [str(i) for i in ids]
    unique = set(ids)
    if len(unique) != len(ids):
        dups = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"ids must be unique; {len(ids) - len(unique)} duplicates, e.g. {dups[:5]}")
    k = split_count(len(ids), percent)
    seed = int(seed)
    chosen = sorted(unique, key=lambda i: _rank(seed, i))[:k]
    return sorted(chosen)


def format_percent(percent):
    """Compact text of a percent: 0.4 -> '0.4', 1.0 -> '1', 12.5 -> '12.5', 100 -> '100'."""
    _check_percent(percent)
    d = Decimal(str(percent)).normalize()
    return format(d, "f")


def split_file_name(percent, seed):
    """``<percent>pct_seed<seed>.txt``, e.g. ``0.4pct_seed1.txt``."""
    return f"{format_percent(percent)}pct_seed{seed}.txt"


def _check_line(text, what):
    text = str(text)
    if not text or text != text.strip() or "\n" in text or "\r" in text:
        raise ValueError(f"{what} {text!r} must be non-empty, on one line, without surrounding spaces")
    return text


def write_split_file(path, ids, header=None):
    """Write ``ids`` one per line after ``# key: value`` lines for ``header`` (a dict); atomic. Returns path."""
    lines = []
    for key, value in (header or {}).items():
        key = _check_line(key, "header key")
        if ":" in key:
            raise ValueError(f"header key {key!r} must not contain ':'")
        lines.append(f"# {key}: {_check_line(value, 'header value')}")
    for i in ids:
        i = _check_line(i, "image id")
        if i.startswith("#"):
            raise ValueError(f"image id {i!r} starts with '#', which split files read as a comment")
        lines.append(i)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _read_lines(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Split file {path} does not exist (absolute: {os.path.abspath(path)}). "
            "Make one with tools/make_splits.py; see datasets/README.md."
        )
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def read_split_header(path):
    """The ``# key: value`` lines of a split file as a dict of strings (other comments are ignored)."""
    header = {}
    for line in _read_lines(path):
        line = line.strip()
        if line.startswith("#") and ":" in line:
            key, value = line[1:].split(":", 1)
            header[key.strip()] = value.strip()
    return header


def read_split_file(path):
    """The image ids listed in a split file, in file order (blank lines and '#' lines skipped)."""
    ids = [s for s in (line.strip() for line in _read_lines(path)) if s and not s.startswith("#")]
    seen = set()
    dups = [i for i in ids if i in seen or seen.add(i)]
    if dups:
        raise ValueError(f"Split file {path} lists {len(dups)} id(s) more than once, e.g. {dups[:5]}")
    return ids


def _repeated(keys):
    seen = set()
    return [k for k in keys if k in seen or seen.add(k)]


def split_keys(records, dataset="<dataset>"):
    """The id of each record in split files: :func:`image_key`, unless two records share one (datasets
    made of several COCO files that each number their images from 1); then every record is keyed by its
    file name: the path relative to the folder all images share, without extension (``survey2/tile_007``).
    Raises ValueError when file names repeat too."""
    keys = [image_key(r) for r in records]
    if not _repeated(keys):
        return keys
    paths = [os.path.splitext(os.path.abspath(r["file_name"]))[0] for r in records]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    by_file = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    dups = _repeated(by_file)
    if dups:
        raise ValueError(
            f"Dataset {dataset!r} has images whose id repeats another's (e.g. {_repeated(keys)[:5]}) and whose "
            f"file names repeat too (e.g. {dups[:5]}), so split files cannot tell them apart."
        )
    return by_file


def _strip_labels(record):
    return {k: v for k, v in record.items() if k not in LABEL_KEYS}


def _copy_missing_metadata(base_name, name):
    """Give ``name`` every metadata key of ``base_name`` it does not have yet (e.g. thing_classes, which
    Detectron2's COCO loader only sets when the base is loaded)."""
    target = MetadataCatalog.get(name)
    have = target.as_dict()
    new = {k: v for k, v in MetadataCatalog.get(base_name).as_dict().items() if k != "name" and k not in have}
    if new:
        target.set(**new)


def _load_split(new_name, base_name, split_file, labeled):
    wanted = read_split_file(split_file)  # before the (possibly slow) base: missing files fail fast
    if not wanted:
        raise ValueError(f"Split file {split_file} lists no image ids.")
    records = DatasetCatalog.get(base_name)
    keys = split_keys(records, base_name)
    known = set(keys)
    unknown = [i for i in wanted if i not in known]
    if unknown:
        made_for = read_split_header(split_file).get("dataset")
        hint = f" Its header says it was made for {made_for!r}." if made_for and made_for != base_name else ""
        raise ValueError(
            f"Split file {split_file} lists {len(unknown)} image id(s) unknown to base dataset {base_name!r} "
            f"({len(records)} images), e.g. {unknown[:_SHOWN]}.{hint}"
        )
    wanted = set(wanted)
    if labeled:
        out = [dict(r) for r, k in zip(records, keys) if k in wanted]
    else:
        out = [_strip_labels(r) for r, k in zip(records, keys) if k not in wanted]
    _copy_missing_metadata(base_name, new_name + ("" if labeled else UNLABELED_SUFFIX))
    return out


def register_split(new_name, base_name, split_file):
    """Register ``new_name`` (base images listed in ``split_file``) and ``new_name + "_unlabeled"`` (the rest,
    labels removed: no annotations, sem_seg_file_name, pan_seg_file_name, segments_info).

    ``base_name`` must be registered already. Metadata of both is copied from the base, plus ``split_base``,
    ``split_file`` (absolute) and ``split_labeled`` / ``split_unlabeled`` naming the two halves.
    The split file is read when a dataset is loaded: unknown ids raise ValueError, a missing file
    FileNotFoundError. Registering the same three arguments again does nothing; reusing a name with other
    arguments raises ValueError. Returns ``[new_name, new_name + "_unlabeled"]``.
    """
    for what, value in (("new_name", new_name), ("base_name", base_name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"register_split: {what} must be a non-empty string, got {value!r}")
    if new_name == base_name:
        raise ValueError(f"register_split: the split {new_name!r} needs a name other than its base's")
    if base_name not in DatasetCatalog.list():
        raise KeyError(
            f"register_split({new_name!r}): base dataset {base_name!r} is not registered. Register it first "
            "(e.g. list it in DATASETS.IMAGE_FOLDERS, or check its spelling)."
        )
    split_file = expand_path(split_file)
    unlabeled_name = new_name + UNLABELED_SUFFIX
    base_meta = {k: v for k, v in MetadataCatalog.get(base_name).as_dict().items() if k != "name"}
    links = dict(split_base=base_name, split_file=split_file, split_labeled=new_name, split_unlabeled=unlabeled_name)
    spec = ("split", base_name, split_file)
    register_once(
        [
            (
                new_name,
                spec + ("labeled",),
                lambda: _load_split(new_name, base_name, split_file, labeled=True),
                {**base_meta, **links},
            ),
            (
                unlabeled_name,
                spec + ("unlabeled",),
                lambda: _load_split(new_name, base_name, split_file, labeled=False),
                {**base_meta, **links},
            ),
        ]
    )
    return [new_name, unlabeled_name]
