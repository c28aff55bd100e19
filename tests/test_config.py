import glob
import os

import pytest
import yaml
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

import selftrain_d2
from selftrain_d2.config import get_selftrain_cfg, load_config
from selftrain_d2.data import MAPPER_REGISTRY
from selftrain_d2.evaluation import EVALUATOR_BUILDERS
from selftrain_d2.orchestration.recipe import load_recipe

from .conftest import DEMO_CONFIG, ROOT

selftrain_d2.register_all()  # every component and config key, for the registry loops below

ALL_YAML = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _is_detectron2_config(data):
    """Detectron2 configs have upper-case top-level keys (MODEL, _BASE_ ...); recipes and sweeps lower-case."""
    return isinstance(data, dict) and all(str(k).isupper() or str(k).startswith("_") for k in data)


def _is_recipe(data):
    stages = data.get("stages") if isinstance(data, dict) else None
    return isinstance(stages, dict) and all(isinstance(v, dict) and "type" in v for v in stages.values())


RECIPES = [p for p in ALL_YAML if _is_recipe(_load(p))]
CONFIGS = [p for p in ALL_YAML if _is_detectron2_config(_load(p))]


def test_configs_exist():
    assert len(CONFIGS) >= 5


def test_every_yaml_is_a_config_a_recipe_or_a_sweep():
    for path in ALL_YAML:
        data = _load(path)
        is_sweep = isinstance(data, dict) and isinstance(data.get("stages"), list)  # tools/sweep.py
        assert path in CONFIGS or path in RECIPES or is_sweep, path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_merges_and_names_registered_components(path):
    cfg = load_config(path)
    assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        assert cfg.MODEL.SEM_SEG_HEAD.NAME in SEM_SEG_HEADS_REGISTRY
    assert cfg.INPUT.DATASET_MAPPER_NAME in MAPPER_REGISTRY


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_parses_and_its_configs_merge(path):
    recipe = load_recipe(path)
    for stage in recipe.stages:
        if "config" in stage.options:
            config = os.path.join(os.path.dirname(path), stage.options["config"])
            load_config(config, [str(o) for o in stage.options.get("opts", [])])


def test_add_selftrain_config_is_idempotent():
    cfg = get_selftrain_cfg()
    before = cfg.dump()
    selftrain_d2.add_selftrain_config(cfg)
    assert cfg.dump() == before


def test_importing_registers_components():
    assert "build_efficientnet_lite_backbone" in BACKBONE_REGISTRY
    assert "semantic" in MAPPER_REGISTRY
    assert {"sem_seg", "coco", "cityscapes_sem_seg", "cityscapes_instance"} <= set(EVALUATOR_BUILDERS)


def test_misspelt_key_in_file_names_file_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{DEMO_CONFIG}"\nSOLVER:\n  BASE_RL: 0.1\n')
    with pytest.raises(KeyError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "SOLVER.BASE_RL" in msg and "SOLVER.BASE_LR" in msg


def test_misspelt_command_line_key_is_named():
    with pytest.raises(KeyError) as e:
        load_config(DEMO_CONFIG, ["MODEL.SEM_SEG_HEAD.NUM_CLASSE", "3"])
    msg = str(e.value)
    assert "command-line" in msg and "MODEL.SEM_SEG_HEAD.NUM_CLASSE" in msg and "NUM_CLASSES" in msg


def test_wrong_type_names_the_key():
    with pytest.raises(ValueError) as e:
        load_config(DEMO_CONFIG, ["SOLVER.MAX_ITER", "'many'"])
    assert "SOLVER.MAX_ITER" in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_old_key_names_still_merge_with_a_warning(tmp_path, caplog):
    """PSEUDO_LABELS, DATASETS.PSEUDO_LABELS and SEMISUP.PSEUDO_LABELS were renamed; files (a base with the new
    names, a child with the old) and options with the old names still merge, into the new keys."""
    (tmp_path / "base.yaml").write_text(
        "OFFLINE_PSEUDO_LABELS:\n  THRESHOLD: 0.3\n  TTA:\n    FLIP: True\n    SCALES: [0.5, 1.0]\n")
    (tmp_path / "old.yaml").write_text(
        "_BASE_: base.yaml\nPSEUDO_LABELS:\n  THRESHOLD: 0.9\n  TTA:\n    SCALES: [1.0, 2.0]\n"
        "DATASETS:\n  PSEUDO_LABELS: [['pl', '/tmp/pl']]\nSEMISUP:\n  PSEUDO_LABELS:\n    SCORE_THRESHOLD: 0.5\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(str(tmp_path / "old.yaml"), ["PSEUDO_LABELS.FORMAT", "soft",
                                                        "SEMISUP.PSEUDO_LABELS.MASK_THRESHOLD", "0.4"])
    pl = cfg.OFFLINE_PSEUDO_LABELS
    assert (pl.THRESHOLD, pl.TTA.FLIP, list(pl.TTA.SCALES), pl.FORMAT) == (0.9, True, [1.0, 2.0], "soft")
    assert cfg.DATASETS.PSEUDO_LABEL_FOLDERS == [["pl", "/tmp/pl"]]
    assert (cfg.SEMISUP.ONLINE_PSEUDO_LABELS.SCORE_THRESHOLD, cfg.SEMISUP.ONLINE_PSEUDO_LABELS.MASK_THRESHOLD) == (
        0.5, 0.4)
    assert "PSEUDO_LABELS" not in cfg and "PSEUDO_LABELS" not in cfg.SEMISUP and "PSEUDO_LABELS" not in cfg.DATASETS
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "PSEUDO_LABELS is now called OFFLINE_PSEUDO_LABELS" in warned
    assert "SEMISUP.PSEUDO_LABELS is now called SEMISUP.ONLINE_PSEUDO_LABELS" in warned
    assert "DATASETS.PSEUDO_LABELS is now called DATASETS.PSEUDO_LABEL_FOLDERS" in warned
