"""Recipe files: a named, ordered list of stages (train a teacher, write pseudo labels, index them, train a
student, evaluate ...), read from YAML and checked before anything runs.

    name: self-training-demo
    stages:
      teacher:        {type: train, config: deeplabv3plus-effnetlite0.yaml}
      pseudo_labels:  {type: pseudo_labels, model: teacher, input: demo_city_unlabeled_sem_seg}
      centroids:      {type: centroid_index, labels: pseudo_labels}
      student:        {type: train, config: student.yaml, pseudo_labels: [pseudo_labels], centroids: [centroids]}
    loops: 1          # optional: repeat a block of stages, each loop's student teaching the next
    loop: {stages: [pseudo_labels, centroids, student], teacher: student}

Paths to configs are relative to the recipe file. Stage options that name other stages must name earlier
ones, so the order in the file is the order of execution.
"""
import copy
import os
from dataclasses import dataclass, field

import yaml

from ..utils.safe_yaml import DuplicateKeyError, UnsafeYAMLError, load_yaml_file

__all__ = ["RecipeError", "StageSpec", "Recipe", "load_recipe", "parse_recipe"]


class RecipeError(ValueError):
    """A recipe file that cannot run as written; the message names the file, stage and key."""


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

    def stage(self, name):
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


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
            for key in _REF_KEYS:
                if key in options:
                    value = options[key]
                    options[key] = [rename(v) for v in value] if isinstance(value, list) else rename(value)
            expanded.append((f"{name}_loop{k}", options))
    return expanded


# Stage options whose values name other stages.
_REF_KEYS = ("model", "labels", "init", "pseudo_labels", "centroids", "class_transfer_from", "teacher")


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
    unknown = set(raw) - {"name", "stages", "loops", "loop", "report"}
    if unknown:
        raise RecipeError(f"{where}: unknown top-level keys {sorted(unknown)} (known: name, stages, loops, loop, report)")
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

    from .stages import STAGE_REGISTRY  # the stage types validate their own options

    seen = []
    specs = []
    for name, options in pairs:
        stage_type = options.pop("type")
        if stage_type not in STAGE_REGISTRY:
            raise RecipeError(
                f"{where}: stage {name!r} has unknown type {stage_type!r}; registered: {sorted(STAGE_REGISTRY)}"
            )
        for key in _REF_KEYS:
            refs = options.get(key)
            for ref in refs if isinstance(refs, list) else [refs]:
                if ref is not None and ref not in seen:
                    raise RecipeError(
                        f"{where}: stage {name!r}: {key}: {ref!r} must name an earlier stage (earlier: {seen})"
                    )
        STAGE_REGISTRY.get(stage_type).check_options(name, options, where)
        specs.append(StageSpec(name, stage_type, options))
        seen.append(name)
    return Recipe(name=str(raw.get("name", os.path.splitext(os.path.basename(path))[0])), stages=specs, path=path)
