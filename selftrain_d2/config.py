"""The config: add_selftrain_config composes the keys every subsystem adds in its own config.py (its
add_<x>_config, registered here on import), and load_config reads a YAML with clear errors."""
import difflib
import importlib
import logging
import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from .utils.safe_yaml import load_yaml_file

__all__ = ["RENAMED_KEYS", "SUBSYSTEMS", "SelftrainCfgNode", "add_selftrain_config", "get_selftrain_cfg",
           "load_config", "register_all", "register_config"]

# Old key (or node) -> its name now. Configs and KEY VALUE options that use an old name still merge, with a
# warning. The three pseudo-label keys say which idea they hold: generating labels offline, registering
# their folders as datasets, or the online teacher's labels in guided distillation.
RENAMED_KEYS = {
    "PSEUDO_LABELS": "OFFLINE_PSEUDO_LABELS",
    "DATASETS.PSEUDO_LABELS": "DATASETS.PSEUDO_LABEL_FOLDERS",
    "SEMISUP.PSEUDO_LABELS": "SEMISUP.ONLINE_PSEUDO_LABELS",
}
_warned = set()


def renamed_key(full_key, source="config"):
    """``full_key`` (dotted) under its current name; an old name is translated, with a warning once per name."""
    for old, new in RENAMED_KEYS.items():
        if full_key == old or full_key.startswith(old + "."):
            if (old, source) not in _warned:
                _warned.add((old, source))
                logging.getLogger(__name__).warning("%s: %s is now called %s; the old name still works but is "
                                                    "deprecated", source, old, new)
            return new + full_key[len(old):]
    return full_key


def _rename_tree(tree, source, prefix=""):
    """A YAML mapping with every old key renamed (an old node's entries go into the new node, winning over
    entries the new node has in the same file)."""
    out = {}
    renamed = []
    for key, value in tree.items():
        full = prefix + str(key)
        if isinstance(value, dict):
            value = _rename_tree(value, source, full + ".")
        new = renamed_key(full, source) if full in RENAMED_KEYS else full  # children move with their node
        if new == full:
            out[key] = value
        else:
            renamed.append((new, value))
    for new, value in renamed:
        parent = out
        parts = new[len(prefix):].split(".")
        for part in parts[:-1]:
            parent = parent.setdefault(part, {})
        parent[parts[-1]] = _deep_merge(parent.get(parts[-1]), value)
    return out


def _deep_merge(base, override):
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged.get(key), value)
    return merged


class SelftrainCfgNode(CN):
    """Detectron2's CfgNode that also merges files and options written with the old names of
    :data:`RENAMED_KEYS`."""

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return _rename_tree(super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe), filename)

    def merge_from_list(self, cfg_list):
        cfg_list = list(cfg_list)
        cfg_list[0::2] = [renamed_key(str(k), "options") for k in cfg_list[0::2]]
        return super().merge_from_list(cfg_list)


# The subsystems, in the order their keys are added. Each registers its components (with Detectron2's registries)
# and its add_<x>_config when imported; add_selftrain_config imports them by name, so every config has every key
# although this module imports nothing above it, and `import selftrain_d2` alone stays light.
SUBSYSTEMS = ("data", "evaluation", "modeling", "solver", "distill", "pseudo_labels", "engine")
_CONFIG_ADDERS = []


def register_config(add):
    """Register ``add(cfg)``, a subsystem's function adding its keys; a decorator."""
    if add not in _CONFIG_ADDERS:
        _CONFIG_ADDERS.append(add)
    return add


def register_all():
    """Import every subsystem of :data:`SUBSYSTEMS`: all components and config keys are then registered."""
    for name in SUBSYSTEMS:
        importlib.import_module(f"{__package__}.{name}")


def _adders():
    order = {f"{__package__}.{name}": i for i, name in enumerate(SUBSYSTEMS)}
    return sorted(_CONFIG_ADDERS, key=lambda add: order.get(add.__module__.rsplit(".", 1)[0], len(order)))


def add_selftrain_config(cfg):
    """Add selftrain-d2's keys to a Detectron2 config in place (idempotent): DeepLab's, the method-level
    SELFTRAIN keys, then every subsystem's ``add_<x>_config`` (registered with :func:`register_config`). Imports
    the subsystems first (:func:`register_all`), so their components are registered too."""
    if "SELFTRAIN" in cfg:
        return cfg
    register_all()
    # DeepLab's keys (poly LR, OHEM loss, ASPP): the DeepLabV3+ baseline and Mask2Former configs use them.
    add_deeplab_config(cfg)

    # Method-level settings live under SELFTRAIN; later stages (pseudo labels, students) add theirs here.
    cfg.SELFTRAIN = CN()
    # Seed every training step's randomness from (SEED, iteration, rank), so a resumed run repeats
    # the uninterrupted one exactly. Needs SEED >= 0 to be reproducible across runs.
    cfg.SELFTRAIN.DETERMINISTIC_STEPS = True
    # Trainer class run by tools/train_net.py, by name in selftrain_d2.engine.TRAINER_REGISTRY
    # ("Trainer": supervised; "SemiSupervisedTrainer": guided distillation with an EMA teacher).
    cfg.SELFTRAIN.TRAINER = "Trainer"
    # Python modules (names or .py files) imported in every process before datasets are registered.
    cfg.SELFTRAIN.IMPORTS = []
    for add in _adders():
        add(cfg)
    return cfg


def _closest_keys(cfg, full_key, n=3):
    def flatten(node, prefix=""):
        for k, v in node.items():
            yield from flatten(v, f"{prefix}{k}.") if isinstance(v, CN) else [f"{prefix}{k}"]

    return difflib.get_close_matches(full_key, list(flatten(cfg)), n=n, cutoff=0.6)


def _explain(cfg, err, source):
    """Turn yacs' bare KeyError / ValueError into one that names the source and suggests keys."""
    msg = str(err.args[0]) if err.args else str(err)
    prefix = next((p for p in ("Non-existent config key: ", "Non-existent key: ") if msg.startswith(p)), None)
    if prefix:
        key = msg[len(prefix):]
        hint = _closest_keys(cfg, key)
        suggestion = f"; did you mean {' or '.join(hint)}?" if hint else ""
        return KeyError(f"{source}: unknown config key {key}{suggestion}")
    return type(err)(f"{source}: {msg}")


def _base_paths(config_file, base):
    """The files ``_BASE_`` names, resolved as fvcore's ``load_yaml_with_base`` does (URLs left out)."""
    bases = base if isinstance(base, list) else [base]
    if not all(isinstance(b, str) and b for b in bases):
        raise ValueError(f"config file {config_file}: _BASE_ must be a path or a list of paths, got {base!r}")
    paths = []
    for b in bases:
        b = os.path.expanduser(b) if b.startswith("~") else b
        if b.startswith(("https://", "http://")):
            continue
        paths.append(b if b.startswith("/") else os.path.join(os.path.dirname(config_file), b))
    return paths


def _check_config_files(config_file, chain=()):
    """Read ``config_file`` and its ``_BASE_`` files with the safe YAML loader: an unsafe tag raises
    ``UnsafeYAMLError`` naming the file and tag, a ``_BASE_`` cycle a ValueError naming the chain."""
    real = os.path.realpath(config_file)
    if real in chain:
        names = [*chain[chain.index(real):], real]
        raise ValueError("_BASE_ cycle: " + " -> ".join(names))
    if not os.path.isfile(config_file):
        where = f" (the _BASE_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {config_file}{where}")
    data = load_yaml_file(config_file)
    if isinstance(data, dict) and "_BASE_" in data:
        for path in _base_paths(config_file, data["_BASE_"]):
            _check_config_files(path, (*chain, real))


def _check_fixed_aspp_pool(cfg, source):
    """Detectron2's DeepLabV3PlusHead pools ASPP with a kernel sized from INPUT.CROP.SIZE and then accepts only
    inputs whose sides are whole multiples of the crop: refuse the sizes this config is known to give it."""
    if cfg.MODEL.SEM_SEG_HEAD.NAME != "DeepLabV3PlusHead" or not cfg.INPUT.CROP.ENABLED:
        return
    crop = tuple(cfg.INPUT.CROP.SIZE)
    short = min(crop)
    problems = []
    if cfg.INPUT.MIN_SIZE_TEST > 0 and cfg.INPUT.MIN_SIZE_TEST % short:
        problems.append(f"INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} (test images' short side) is not a "
                        f"multiple of {short}")
    if min(cfg.INPUT.MIN_SIZE_TRAIN) < short:
        problems.append(f"INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)} resizes training images below the "
                        "crop, and a batch of such images has other sizes")
    if cfg.INPUT.CROP_SCHEDULE.ENABLED:
        problems.append("INPUT.CROP_SCHEDULE trains at other crop sizes")
    if problems:
        raise ValueError(
            f"{source}: MODEL.SEM_SEG_HEAD.NAME DeepLabV3PlusHead (Detectron2's) sizes its ASPP pooling from "
            f"INPUT.CROP.SIZE {crop} and fails on inputs whose sides are not whole multiples of it, but "
            + "; ".join(problems) + ". Use MODEL.SEM_SEG_HEAD.NAME DeepLabV3PlusGlobalPoolHead: it pools the whole "
            "feature map at any size and loads the same weights")


def get_selftrain_cfg():
    """Detectron2's default config with selftrain-d2's keys added (a :class:`SelftrainCfgNode`)."""
    return _as_selftrain_node(add_selftrain_config(get_cfg()))


def _as_selftrain_node(node):
    """``node`` with every (sub)node a :class:`SelftrainCfgNode` (yacs refuses to merge nodes of other types),
    keeping which nodes accept new keys."""
    out = SelftrainCfgNode(new_allowed=node.is_new_allowed())
    for key, value in node.items():
        out[key] = _as_selftrain_node(value) if isinstance(value, CN) else value
    return out


def load_config(config_file=None, opts=()):
    """Default config + ``config_file`` (with ``_BASE_``) + ``KEY VALUE`` overrides, with errors
    that name the file or option and suggest the nearest known key for a misspelt one. Every file is read
    with a safe YAML loader: a tag that would run code is an error naming the file and the tag."""
    cfg = get_selftrain_cfg()
    if config_file:
        _check_config_files(config_file)
        try:
            # Every file of the chain was just read safely; allow_unsafe=False keeps it so (Detectron2's default
            # would fall back to yaml.unsafe_load).
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except (KeyError, ValueError) as e:
            raise _explain(cfg, e, f"config file {config_file}") from None
    if opts:
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise _explain(cfg, e, "command-line options") from None
    _check_fixed_aspp_pool(cfg, f"config file {config_file}" if config_file else "config")
    return cfg
