"""Datasets declared in the config, and the register-once rule.

``register_from_cfg(cfg)`` is called by every entry point in every process after the config is merged
(``setup()``: training, evaluation, pseudo labels, recipe stages, sweep trials, DDP workers), so that all
of them know the same datasets. It imports ``SELFTRAIN.IMPORTS`` first, then registers, in this order:
``IMAGE_FOLDERS``, ``COCO_INSTANCES``, ``SEM_SEG``, ``PSEUDO_LABEL_FOLDERS``, ``SEM_SEG_FROM_COCO``, ``SPLITS``,
``HELDOUT``; an entry may name a dataset of an earlier key (or a builtin, or one an import registered).
"""
import importlib
import importlib.util
import os
import sys

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "DATASET_KEYS",
    "check_entries",
    "expand_path",
    "import_modules",
    "is_path_like",
    "register_from_cfg",
    "register_once",
    "register_dataset_kind",
    "register_once_by",
    "resolve_entry_paths",
]

# name -> spec of every dataset registered through register_once in this process.
_REGISTERED = {}


def expand_path(path, base=None):
    """``~`` and ``$VARS`` expanded, made absolute (relative paths are taken from ``base``, by default the
    current directory)."""
    path = os.path.expandvars(os.path.expanduser(os.fspath(path)))
    return os.path.abspath(os.path.join(base, path) if base else path)


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


def _forget_metadata(name):
    if name in _REGISTERED:
        # Registered by us, then removed from DatasetCatalog by someone: start its metadata afresh.
        MetadataCatalog.remove(name)


def register_once_by(name, spec, register):
    """:func:`register_once` for one dataset that ``register()`` registers (e.g. with Detectron2's
    ``register_coco_instances``). Returns True when it was registered now."""
    if not _needs_registering(name, spec):
        return False
    _forget_metadata(name)
    register()
    _REGISTERED[name] = spec
    return True


def register_once(entries):
    """Register datasets, each at most once per process.

    ``entries``: list of ``(name, spec, loader, metadata)``; ``spec`` is a hashable description of the
    arguments (e.g. ``("image_folder", "/abs/folder")``). A name already registered with an equal spec is
    skipped; with another spec, or by other code, a ValueError is raised before anything is registered.
    Returns the names registered by this call.
    """
    todo = [e for e in entries if _needs_registering(e[0], e[1])]
    for name, spec, loader, metadata in todo:
        _forget_metadata(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**metadata)
        _REGISTERED[name] = spec
    return [e[0] for e in todo]


# Config key -> (required fields, optional fields, indexes of fields that are paths). Paths are expanded
# by the registering code (relative to the current directory); a recipe resolves them from its own folder.
DATASET_KEYS = {
    "IMAGE_FOLDERS": (("NAME", "FOLDER"), (), (1,)),
    "COCO_INSTANCES": (("NAME", "JSON_FILE", "IMAGE_ROOT"), (), (1, 2)),
    "SEM_SEG": (("NAME", "IMAGE_DIR", "LABEL_DIR", "CLASSES"), ("IGNORE_LABEL",), (1, 2, 3)),
    "PSEUDO_LABEL_FOLDERS": (("NAME", "DIR"), (), (1,)),
    "SEM_SEG_FROM_COCO": (("NAME", "COCO_DATASET"), ("LABEL_DIR",), (2,)),
    "SPLITS": (("NEW_NAME", "BASE_DATASET", "SPLIT_FILE"), (), (2,)),
    "HELDOUT": (("DATASET", "LABELS"), (), (1,)),
}
# Fields that are not plain strings; the registering code checks them.
_FREE_FIELDS = {("SEM_SEG", 3), ("SEM_SEG", 4)}


def is_path_like(value):
    """Whether a HELDOUT ``LABELS`` value is a folder rather than a dataset name (it holds a path separator
    or starts with ``~`` or ``$``)."""
    return isinstance(value, str) and (os.sep in value or "/" in value or value.startswith(("~", "$")))


def check_entries(key, value, where="cfg.DATASETS"):
    """The entries of ``DATASETS.<key>`` as tuples, after checking their shape; ValueError naming
    ``<where>.<key>[i]`` and the expected fields otherwise."""
    required, optional, _ = DATASET_KEYS[key]
    fields = ", ".join(required + tuple(f"optional {f}" for f in optional))
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}.{key} must be a list of [{fields}] lists, got {value!r}.")
    out = []
    for i, entry in enumerate(value):
        ok = isinstance(entry, (list, tuple)) and len(required) <= len(entry) <= len(required) + len(optional)
        if ok:
            ok = all(
                (key, j) in _FREE_FIELDS or (isinstance(x, str) and x.strip()) for j, x in enumerate(entry)
            )
        if not ok:
            count = f"{len(required)}" + (f" to {len(required) + len(optional)}" if optional else "")
            raise ValueError(
                f"{where}.{key}[{i}] must be a list of {count} non-empty strings [{fields}], got {entry!r}."
            )
        out.append(tuple(entry))
    return out


def resolve_entry_paths(key, entry, base):
    """``entry`` of ``DATASETS.<key>`` with its path fields made absolute from the folder ``base`` (a HELDOUT
    dataset name and a SEM_SEG class list are left alone)."""
    paths = DATASET_KEYS[key][2]
    out = list(entry)
    for j in paths:
        if j >= len(out) or not isinstance(out[j], str):
            continue
        if key == "HELDOUT" and not is_path_like(out[j]):
            continue
        out[j] = expand_path(out[j], base)
    return out


def _entries(cfg, key):
    datasets = cfg.DATASETS
    value = datasets.get(key, []) if hasattr(datasets, "get") else getattr(datasets, key, [])
    return check_entries(key, value)


def import_modules(modules, where="SELFTRAIN.IMPORTS"):
    """Import each module name or ``.py`` file (for its registrations) once per process; returns the modules.

    A file is imported under its stem as module name; another file already imported under that name is an
    error naming both."""
    if isinstance(modules, str) or not isinstance(modules, (list, tuple)):
        raise ValueError(f"{where} must be a list of module names or .py files, got {modules!r}")
    imported = []
    for i, module in enumerate(modules):
        if not isinstance(module, str) or not module.strip():
            raise ValueError(f"{where}[{i}] must be a module name or a .py file, got {module!r}")
        if not module.endswith(".py"):
            try:
                imported.append(importlib.import_module(module))
            except ImportError as e:
                raise ImportError(f"{where}[{i}]: cannot import module {module!r}: {e}") from e
            continue
        path = expand_path(module)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}[{i}]: {module} is not a file (absolute: {path})")
        name = os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(name)
        if loaded is not None:
            if os.path.abspath(getattr(loaded, "__file__", "") or "") != path:
                raise ImportError(
                    f"{where}[{i}]: {path} would be imported as module {name!r}, which is already "
                    f"{getattr(loaded, '__file__', None) or 'a built-in module'}; rename the file"
                )
            imported.append(loaded)
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        imported.append(mod)
    return imported


def _check_ignore_label(cfg, entry, index):
    """A SEM_SEG dataset used by this config must mark unlabelled pixels with the ignore value that the
    mappers and the loss use."""
    if len(entry) < 5:
        return
    model = cfg.get("MODEL", None) if hasattr(cfg, "get") else None
    ignore = model.SEM_SEG_HEAD.get("IGNORE_VALUE", None) if model is not None and "SEM_SEG_HEAD" in model else None
    used = [n for key in ("TRAIN", "TEST", "TRAIN_UNLABELED") for n in cfg.DATASETS.get(key, ())]
    if ignore is not None and entry[0] in used and entry[4] != ignore:
        raise ValueError(
            f"cfg.DATASETS.SEM_SEG[{index}]: {entry[0]!r} marks unlabelled pixels with IGNORE_LABEL {entry[4]}, but "
            f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE is {ignore}: set MODEL.SEM_SEG_HEAD.IGNORE_VALUE {entry[4]}"
        )


# DATASETS keys whose entries a layer above this one registers: "PSEUDO_LABEL_FOLDERS" (pseudo-label folders, by
# selftrain_d2.pseudo_labels, which the package imports).
_KIND_REGISTRARS = {}


def register_dataset_kind(key, register):
    """Let ``register(*entry)`` register the entries of ``cfg.DATASETS.<key>`` (for a layer above the data
    layer, such as the pseudo-label folders, which this module must not import)."""
    _KIND_REGISTRARS[key] = register


def _kind_registrar(key):
    if key not in _KIND_REGISTRARS:
        raise RuntimeError(f"cfg.DATASETS.{key}: no registrar for these datasets; call "
                           "selftrain_d2.register_all() (building a config with load_config does)")
    return _KIND_REGISTRARS[key]


def register_from_cfg(cfg):
    """Import ``cfg.SELFTRAIN.IMPORTS``, then register every dataset of the ``cfg.DATASETS`` keys of
    :data:`DATASET_KEYS` (in the order of the module docstring); returns their names.

    Idempotent: calling it again with the same config registers nothing new. A name already registered with
    other arguments (or by other code) is a ValueError naming both.
    """
    from .coco import register_coco_instances_once, register_sem_seg_from_coco
    from .heldout import register_heldout
    from .image_folder import register_image_folder
    from .sem_seg_folder import register_sem_seg_folder
    from .splits import register_split

    selftrain = cfg.get("SELFTRAIN", None) if hasattr(cfg, "get") else None
    if selftrain is not None and selftrain.get("IMPORTS", None):
        import_modules(list(selftrain.IMPORTS))
    entries = {key: _entries(cfg, key) for key in DATASET_KEYS}
    names = []
    for name, folder in entries["IMAGE_FOLDERS"]:
        names.append(register_image_folder(name, folder))
    for name, json_file, image_root in entries["COCO_INSTANCES"]:
        names.append(register_coco_instances_once(name, json_file, image_root))
    for i, entry in enumerate(entries["SEM_SEG"]):
        names.append(register_sem_seg_folder(*entry, where=f"cfg.DATASETS.SEM_SEG[{i}]"))
        _check_ignore_label(cfg, entry, i)
    for name, folder in entries["PSEUDO_LABEL_FOLDERS"]:
        names.append(_kind_registrar("PSEUDO_LABEL_FOLDERS")(name, folder))
    for entry in entries["SEM_SEG_FROM_COCO"]:
        names.append(register_sem_seg_from_coco(*entry))
    for new_name, base_name, split_file in entries["SPLITS"]:
        names.extend(register_split(new_name, base_name, split_file))
    for dataset, labels in entries["HELDOUT"]:
        register_heldout(dataset, labels)
    return names
