"""Recipe files: a named, ordered list of stages (train a teacher, write pseudo labels, index them, train a
student, evaluate ...), read from YAML and checked before anything runs.

    name: self-training-demo
    stages:
      teacher:        {type: train, config: deeplabv3plus-effnetlite0.yaml}
      pseudo_labels:  {type: pseudo_labels, model: teacher, input: demo_city_unlabeled_sem_seg}
      centroids:      {type: centroid_index, labels: pseudo_labels}
      student:        {type: train, config: student.yaml, pseudo_labels: [pseudo_labels], centroids: [centroids]}
      # soft_labels: [pseudo_labels] trains on those labels' soft probabilities (written with FORMAT soft)
    loops: 1          # optional: repeat a block of stages, each loop's student teaching the next
    loop: {stages: [pseudo_labels, centroids, student], teacher: student}

Paths to configs are relative to the recipe file. Stage options that name other stages must name earlier
ones, so the order in the file is the order of execution.

The data can be described once, at the top, for every stage:

    datasets:         # the DATASETS registration keys of the config (see datasets/README.md)
      COCO_INSTANCES: [[my_train, data/train.json, data/images]]
      SEM_SEG_FROM_COCO: [[my_train_sem_seg, my_train]]
    imports: [my_registrations.py, my_package.datasets]   # imported in every stage process

Each ``datasets`` key is added to the same key of every training stage's config (after the config's own
entries), paths relative to the recipe file. ``datasets`` may also name a YAML file holding that mapping
(relative to the recipe; paths in it relative to itself), so several recipes share one description.
``imports`` is added to ``SELFTRAIN.IMPORTS`` likewise (module names, or ``.py`` files relative to the recipe
file). Pseudo-label and evaluation stages run on the config their model was trained with, so they see both.
"""
import copy
import os
from dataclasses import dataclass, field

import yaml

from ...utils.safe_yaml import DuplicateKeyError, UnsafeYAMLError, load_yaml_file
from .errors import RecipeError
from .stages import STAGE_REGISTRY

__all__ = ["RecipeError", "StageSpec", "Recipe", "load_recipe", "parse_recipe"]


@dataclass
class StageSpec:
    name: str
    type: str
    options: dict = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    stages: list  # [StageSpec], in execution order
    path: str = ""  # the recipe file; configs are resolved relative to its folder
    datasets: dict = field(default_factory=dict)  # DATASETS key -> entries (paths absolute), for every stage
    imports: list = field(default_factory=list)  # SELFTRAIN.IMPORTS for every stage (files absolute)

    def stage(self, name):
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def data_opts(self, config_file=None, opts=()):
        """``KEY VALUE`` overrides that add the recipe's ``datasets`` and ``imports`` to the config
        ``config_file`` with ``opts`` (entries it has already are not repeated)."""
        if not self.datasets and not self.imports:
            return []
        from ...config import load_config

        cfg = load_config(config_file, list(opts))
        out = []
        for key, entries in self.datasets.items():
            merged = [list(e) for e in cfg.DATASETS.get(key, [])]
            merged += [e for e in entries if e not in merged]
            out += [f"DATASETS.{key}", repr(merged)]
        if self.imports:
            merged = list(cfg.SELFTRAIN.IMPORTS)
            out += ["SELFTRAIN.IMPORTS", repr(merged + [m for m in self.imports if m not in merged])]
        return out


def load_recipe(path):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    try:
        # unique_keys: two stages of one name would otherwise leave only the last.
        raw = load_yaml_file(path, unique_keys=True)
    except (DuplicateKeyError, UnsafeYAMLError) as e:
        raise RecipeError(str(e)) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    return parse_recipe(raw, path)


def _expand_loops(stages, raw, where):
    loops = raw.get("loops", 1)
    if not isinstance(loops, int) or loops < 1:
        raise RecipeError(f"{where}: 'loops' must be a positive integer, got {loops!r}")
    if loops == 1:
        return stages
    loop = raw.get("loop")
    if not isinstance(loop, dict) or not loop.get("stages") or not loop.get("teacher"):
        raise RecipeError(f"{where}: 'loops: {loops}' needs 'loop: {{stages: [...], teacher: STAGE}}'")
    body = list(loop["stages"])
    names = [name for name, _ in stages]
    for name in body + [loop["teacher"]]:
        if name not in names:
            raise RecipeError(f"{where}: loop stage {name!r} is not one of the stages {names}")
    if loop["teacher"] not in body:
        raise RecipeError(f"{where}: loop teacher {loop['teacher']!r} must be one of the loop's stages {body}")
    by_name = dict(stages)
    # The stage the first loop's body takes its model from (outside the body) is replaced, in loop k > 1,
    # by the loop teacher of loop k - 1; names inside the body get the suffix _loop<k>.
    expanded = list(stages)
    for k in range(2, loops + 1):
        def rename(ref, k=k):
            if ref in body:
                return f"{ref}_loop{k}"
            if ref == loop.get("replaces", _first_model_ref(body, by_name)):
                prev = loop["teacher"] if k == 2 else f"{loop['teacher']}_loop{k - 1}"
                return prev
            return ref

        for name in body:
            options = copy.deepcopy(by_name[name])
            for key in _ref_keys(options):
                if key in options:
                    value = options[key]
                    options[key] = [rename(v) for v in value] if isinstance(value, list) else rename(value)
            expanded.append((f"{name}_loop{k}", options))
    return expanded


def _ref_keys(options):
    """The options of a stage (of a registered type) whose values name earlier stages: its type's ``REFS``."""
    stage_type = options.get("type")
    return STAGE_REGISTRY.get(stage_type).REFS if stage_type in STAGE_REGISTRY else ()


def _first_model_ref(body, by_name):
    for name in body:
        ref = by_name[name].get("model")
        if ref is not None and ref not in body:
            return ref
    return None


def parse_recipe(raw, path="<recipe>"):
    where = path
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with 'name' and 'stages', got {type(raw).__name__}")
    known = ("name", "stages", "loops", "loop", "report", "datasets", "imports")
    unknown = set(raw) - set(known)
    if unknown:
        raise RecipeError(f"{where}: unknown top-level keys {sorted(unknown)} (known: {', '.join(known)})")
    datasets, imports = _parse_data(raw, path)
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise RecipeError(f"{where}: 'stages' must be a non-empty mapping of stage name -> options")
    pairs = []
    for name, options in stages.items():
        if not isinstance(options, dict) or "type" not in options:
            raise RecipeError(f"{where}: stage {name!r} must be a mapping with a 'type'")
        pairs.append((str(name), dict(options)))
    pairs = _expand_loops(pairs, raw, where)
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RecipeError(f"{where}: more than one stage is named {repeated}")

    seen = []
    specs = []
    for name, options in pairs:
        stage_type = options.pop("type")
        if stage_type not in STAGE_REGISTRY:
            raise RecipeError(
                f"{where}: stage {name!r} has unknown type {stage_type!r}; registered: {sorted(STAGE_REGISTRY)}"
            )
        for key in STAGE_REGISTRY.get(stage_type).REFS:
            refs = options.get(key)
            for ref in refs if isinstance(refs, list) else [refs]:
                if ref is not None and ref not in seen:
                    raise RecipeError(
                        f"{where}: stage {name!r}: {key}: {ref!r} must name an earlier stage (earlier: {seen})"
                    )
        STAGE_REGISTRY.get(stage_type).check_options(name, options, where)
        specs.append(StageSpec(name, stage_type, options))
        seen.append(name)
    return Recipe(name=str(raw.get("name", os.path.splitext(os.path.basename(path))[0])), stages=specs, path=path,
                  datasets=datasets, imports=imports)


def _parse_data(raw, path):
    """The recipe's ``datasets`` (checked like the config keys, paths made absolute from the recipe's folder)
    and ``imports``."""
    from ...data.datasets.register import DATASET_KEYS, check_entries, resolve_entry_paths

    base = os.path.dirname(os.path.abspath(path)) if path and not path.startswith("<") else os.getcwd()
    block, data_base, where = raw.get("datasets") or {}, base, f"{path}: datasets"
    allowed = [k for k in DATASET_KEYS if k != "PSEUDO_LABEL_FOLDERS"]  # pseudo labels come from the stages
    if isinstance(block, str):  # a file holding the mapping, shared by several recipes
        data_file = os.path.join(base, os.path.expanduser(block))
        if not os.path.isfile(data_file):
            raise RecipeError(f"{where}: {block} is not a file (absolute: {data_file})")
        with open(data_file) as f:
            try:
                block = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise RecipeError(f"{where}: {data_file} is not valid YAML: {e}") from None
        data_base, where = os.path.dirname(data_file), data_file
    if not isinstance(block, dict):
        raise RecipeError(f"{where} must be a mapping of DATASETS keys ({', '.join(allowed)}) to lists, or a file "
                          "holding one")
    datasets = {}
    for key, value in block.items():
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
        try:
            entries = check_entries(key, value, where=where)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        datasets[key] = [resolve_entry_paths(key, e, data_base) for e in entries]
    imports = raw.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(m, str) and m.strip() for m in imports):
        raise RecipeError(f"{path}: 'imports' must be a list of module names or .py files, got {imports!r}")
    imports = [os.path.join(base, os.path.expanduser(m)) if m.endswith(".py") else m for m in imports]
    missing = [m for m in imports if m.endswith(".py") and not os.path.isfile(m)]
    if missing:
        raise RecipeError(f"{path}: imports: {missing} not found (.py files are relative to the recipe file)")
    return datasets, imports
