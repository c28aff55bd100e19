"""Path checks in front of Detectron2's builtin COCO / Cityscapes loaders.

Detectron2 registers ``coco_2017_train``, ``cityscapes_fine_sem_seg_train`` and friends when it is imported,
with paths under ``$DETECTRON2_DATASETS`` (default ``./datasets``). When the data is not there, the loaders
fail deep inside pycocotools or with a bare ``AssertionError``. Here each such loader is re-registered under
the same name behind one generic check: before loading, every path named in the dataset's metadata
(``image_root``, ``json_file``, ``image_dir``, ``gt_dir`` ...) must exist, otherwise a ``FileNotFoundError``
names the dataset, the missing paths, ``$DETECTRON2_DATASETS`` and ``datasets/README.md``.
Metadata is left untouched: only the ``DatasetCatalog`` entry is replaced.
"""
import importlib.util
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "BUILTIN_PREFIXES",
    "PATH_KEYS",
    "add_path_checks",
    "add_path_checks_to_builtin",
    "check_dataset_paths",
]

# Metadata keys that hold a file or folder a loader (or its evaluator) reads.
PATH_KEYS = (
    "image_root",
    "json_file",
    "image_dir",
    "gt_dir",
    "panoptic_root",
    "panoptic_json",
    "sem_seg_root",
    "dirname",
)

# Name prefixes of the datasets Detectron2 registers at import: COCO (instances, keypoints, panoptic),
# Cityscapes (instance, semantic, panoptic), and LVIS / VOC / ADE20K, which get the same check for free.
BUILTIN_PREFIXES = (
    "coco_",
    "keypoints_coco_",
    "cityscapes_fine_",
    "lvis_",
    "voc_",
    "ade20k_sem_seg_",
)

_README = "datasets/README.md (in the selftrain-d2 repository)"
_PREPARE_CITYSCAPES = "datasets/prepare_cityscapes.sh"
_CHECKED_ATTR = "_selftrain_path_checked"


def _datasets_root_note():
    value = os.environ.get("DETECTRON2_DATASETS")
    if value is None:
        return (
            "DETECTRON2_DATASETS is not set, so Detectron2 looks under ./datasets relative to the current "
            f"directory ({os.getcwd()})"
        )
    return f"DETECTRON2_DATASETS={value!r}"


def check_dataset_paths(name, metadata=None):
    """Raise FileNotFoundError when a path in the metadata of dataset ``name`` does not exist.

    Every key of :data:`PATH_KEYS` that the metadata has is checked (URLs are skipped); the error lists all
    missing ones at once.
    """
    meta = (metadata if metadata is not None else MetadataCatalog.get(name)).as_dict()
    missing = []
    for key in PATH_KEYS:
        path = meta.get(key)
        if not isinstance(path, (str, os.PathLike)):
            continue
        path = os.fspath(path)
        if "://" in path or os.path.exists(path):
            continue
        where = "" if os.path.isabs(path) else f" (absolute: {os.path.abspath(path)})"
        missing.append(f"  {key}: {path}{where}")
    if missing:
        raise FileNotFoundError(
            f"Dataset {name!r} cannot be loaded: these paths do not exist:\n"
            + "\n".join(missing)
            + f"\n{_datasets_root_note()}; Detectron2 fixes its dataset root once, when it is imported. "
            f"See {_README} for the expected layout."
        )


def _first_file_with_suffix(folder, suffix):
    """Whether ``folder`` or one of its immediate subfolders (Cityscapes' cities) holds a ``*suffix`` file."""
    with os.scandir(folder) as entries:
        subdirs = []
        for entry in entries:
            if entry.is_file() and entry.name.endswith(suffix):
                return True
            if entry.is_dir():
                subdirs.append(entry.path)
    for sub in sorted(subdirs):
        with os.scandir(sub) as entries:
            if any(e.name.endswith(suffix) and e.is_file() for e in entries):
                return True
    return False


def _cityscapes_train_ids_missing(name, detail):
    return FileNotFoundError(
        f"Dataset {name!r}: {detail}\n"
        "Detectron2's Cityscapes semantic loader reads *_gtFine_labelTrainIds.png, which cityscapesscripts "
        f"generates from the polygon annotations. Run `bash {_PREPARE_CITYSCAPES}` (it calls "
        f"createTrainIdLabelImgs with CITYSCAPES_DATASET set). {_datasets_root_note()}. See {_README}."
    )


def _check_cityscapes_semantic_before(name, meta):
    gt_dir = meta.get("gt_dir")
    if gt_dir and os.path.isdir(gt_dir) and not _first_file_with_suffix(gt_dir, "_gtFine_labelTrainIds.png"):
        raise _cityscapes_train_ids_missing(name, f"no *_gtFine_labelTrainIds.png found under {gt_dir}.")


def _check_cityscapes_semantic_after(name, meta, records):
    missing = [
        r["sem_seg_file_name"]
        for r in records
        if "sem_seg_file_name" in r and not os.path.isfile(r["sem_seg_file_name"])
    ]
    if missing:
        shown = "".join(f"\n  {p}" for p in missing[:3])
        more = f"\n  ... and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise _cityscapes_train_ids_missing(
            name, f"{len(missing)} of {len(records)} label files are missing:{shown}{more}"
        )


def _check_cityscapes_instance_before(name, meta):
    # Detectron2 reads the polygon json files with shapely, which it does not declare as a dependency.
    if importlib.util.find_spec("shapely") is None:
        raise ModuleNotFoundError(
            f"Dataset {name!r}: Detectron2's Cityscapes instance loader needs the package 'shapely' to read "
            "the *_gtFine_polygons.json annotations; install it (pip install shapely)."
        )


# Extra checks by metadata evaluator_type: (before loading, after loading).
_RECORD_CHECKS = {
    "cityscapes_sem_seg": (_check_cityscapes_semantic_before, _check_cityscapes_semantic_after),
    "cityscapes_instance": (_check_cityscapes_instance_before, None),
}


class _CheckedLoader:
    """A dataset function that checks the metadata paths (and known record needs) before loading."""

    def __init__(self, name, loader):
        self.name = name
        self.loader = loader
        setattr(self, _CHECKED_ATTR, True)

    def __call__(self):
        metadata = MetadataCatalog.get(self.name)
        check_dataset_paths(self.name, metadata)
        meta = metadata.as_dict()
        before, after = _RECORD_CHECKS.get(meta.get("evaluator_type"), (None, None))
        if before is not None:
            before(self.name, meta)
        records = self.loader()
        if after is not None:
            after(self.name, meta, records)
        return records

    def __repr__(self):
        return f"checked({self.name!r}, {self.loader!r})"


def add_path_checks(name):
    """Re-register dataset ``name`` behind :func:`check_dataset_paths`; idempotent; metadata is kept.

    Returns True when the loader was wrapped now, False when it already was.
    """
    loader = DatasetCatalog[name] if name in DatasetCatalog.list() else None
    if loader is None:
        raise KeyError(f"Dataset {name!r} is not registered, so no path check can be added to it.")
    if getattr(loader, _CHECKED_ATTR, False):
        return False
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, _CheckedLoader(name, loader))
    return True


def add_path_checks_to_builtin(prefixes=BUILTIN_PREFIXES):
    """Wrap every registered dataset whose name starts with one of ``prefixes`` (Detectron2's builtins).

    Idempotent: a loader already wrapped is left as it is. Returns the names wrapped by this call.
    """
    prefixes = tuple(prefixes)
    wrapped = []
    for name in sorted(DatasetCatalog.list()):
        if name.startswith(prefixes) and add_path_checks(name):
            wrapped.append(name)
    return wrapped
