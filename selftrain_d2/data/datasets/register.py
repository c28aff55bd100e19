"""Datasets declared in the config (image folders, label-fraction splits), and the register-once rule.

``register_from_cfg(cfg)`` is called by the training entry point in every process after the config is
merged, so that worker processes launched by DDP know the same datasets.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_from_cfg", "register_once", "expand_path"]

# name -> spec of every dataset registered through register_once in this process.
_REGISTERED = {}


def expand_path(path):
    """``~`` and ``$VARS`` expanded, made absolute (relative paths are taken from the current directory)."""
    return os.path.abspath(os.path.expandvars(os.path.expanduser(os.fspath(path))))


def _needs_registering(name, spec):
    """True when ``name`` is free, False when it is already registered with the same ``spec``; else raise."""
    if name not in DatasetCatalog.list():
        return True
    previous = _REGISTERED.get(name)
    if previous == spec:
        return False
    if previous is None:
        raise ValueError(
            f"Dataset {name!r} is already registered by other code; cannot register it as {spec}. "
            "Choose another name."
        )
    raise ValueError(
        f"Dataset {name!r} is already registered as {previous}; cannot register it again as {spec}."
    )


def register_once(entries):
    """Register datasets, each at most once per process.

    ``entries``: list of ``(name, spec, loader, metadata)``; ``spec`` is a hashable description of the
    arguments (e.g. ``("image_folder", "/abs/folder")``). A name already registered with an equal spec is
    skipped; with another spec, or by other code, a ValueError is raised before anything is registered.
    Returns the names registered by this call.
    """
    todo = [e for e in entries if _needs_registering(e[0], e[1])]
    for name, spec, loader, metadata in todo:
        if name in _REGISTERED:
            # Registered by us, then removed from DatasetCatalog by someone: start its metadata afresh.
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**metadata)
        _REGISTERED[name] = spec
    return [e[0] for e in todo]


def _entries(cfg, key, length, fields):
    datasets = cfg.DATASETS
    value = datasets.get(key, []) if hasattr(datasets, "get") else getattr(datasets, key, [])
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"cfg.DATASETS.{key} must be a list of [{', '.join(fields)}] lists, got {value!r}."
        )
    for i, entry in enumerate(value):
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == length
            and all(isinstance(x, str) and x.strip() for x in entry)
        )
        if not ok:
            raise ValueError(
                f"cfg.DATASETS.{key}[{i}] must be a list of {length} non-empty strings "
                f"[{', '.join(fields)}], got {entry!r}."
            )
    return [tuple(entry) for entry in value]


def register_from_cfg(cfg):
    """Register ``cfg.DATASETS.IMAGE_FOLDERS``, ``PSEUDO_LABELS`` and ``SPLITS``; returns all their names.

    Folders and pseudo labels first, so that a split may take one of them as its base. Idempotent: calling it
    again with the same config registers nothing new.
    """
    from .image_folder import register_image_folder
    from .splits import register_split

    folders = _entries(cfg, "IMAGE_FOLDERS", 2, ("NAME", "FOLDER"))
    pseudo = _entries(cfg, "PSEUDO_LABELS", 2, ("NAME", "DIR"))
    splits = _entries(cfg, "SPLITS", 3, ("NEW_NAME", "BASE_DATASET", "SPLIT_FILE"))
    names = []
    for name, folder in folders:
        register_image_folder(name, folder)
        names.append(name)
    if pseudo:
        from ...pseudo_labels.generate import register_pseudo_label_dataset

        for name, folder in pseudo:
            names.append(register_pseudo_label_dataset(name, folder))
    for new_name, base_name, split_file in splits:
        names.extend(register_split(new_name, base_name, split_file))
    return names
