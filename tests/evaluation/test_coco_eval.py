"""COCO mask / box AP through faster-coco-eval's compiled COCOeval, with pycocotools' as the fallback: the same
figures both ways, on a small synthetic set."""
import copy
import sys

import pytest
from detectron2.evaluation import coco_evaluation

from benchmarks.coco_eval_speed import register_synthetic, same_results, synthetic_coco
from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.evaluation import FastCOCOEvaluator, build_evaluator
from selftrain_d2.evaluation.coco import compiled_cocoeval


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """12 images of 48 x 64 with 6 objects each (some crowd), predictions with misses, wrong classes and false
    positives; returns (dataset name, [(image_id, Instances)])."""
    folder = tmp_path_factory.mktemp("coco")
    json_file, predictions = synthetic_coco(str(folder), num_images=12, instances=6, size=(48, 64), seed=3)
    name = "test_coco_eval_synthetic"
    register_synthetic(name, json_file)
    return name, list(predictions())


def _evaluate(name, predictions, **kwargs):
    evaluator = FastCOCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, **kwargs)
    evaluator.reset()
    for image_id, instances in predictions:
        evaluator.process([{"image_id": image_id}], [{"instances": copy.deepcopy(instances)}])
    return evaluator, evaluator.evaluate()


def test_compiled_and_pycocotools_give_the_same_ap(synthetic, monkeypatch):
    name, predictions = synthetic
    compiled = compiled_cocoeval()
    assert compiled is not None, "faster-coco-eval is pinned in requirements/base.txt: run `make setup`"
    runs = []
    real_evaluate = compiled.evaluate
    monkeypatch.setattr(compiled, "evaluate", lambda self: (runs.append(self.params.iouType), real_evaluate(self))[1])
    original = coco_evaluation._evaluate_predictions_on_coco

    evaluator, fast = _evaluate(name, predictions)
    assert evaluator._compiled is compiled and sorted(runs) == ["bbox", "segm"]
    assert coco_evaluation._evaluate_predictions_on_coco is original  # Detectron2's module is left as it was
    runs.clear()
    _, slow = _evaluate(name, predictions, compiled=False)
    assert runs == []

    assert 5 < fast["segm"]["AP"] < 95 and 5 < fast["bbox"]["AP"] < 95  # neither trivial nor broken
    assert same_results(fast, slow), (fast, slow)


def test_pycocotools_when_faster_coco_eval_is_not_importable(synthetic, monkeypatch):
    name, predictions = synthetic
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import raises ImportError
    assert compiled_cocoeval() is None
    evaluator, fallback = _evaluate(name, predictions)
    assert evaluator._compiled is None
    monkeypatch.undo()
    _, fast = _evaluate(name, predictions)
    assert same_results(fallback, fast)


def test_build_evaluator_gives_the_compiled_coco_evaluator(synthetic, tmp_path):
    name, _ = synthetic
    cfg = get_selftrain_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get(name).evaluator_type = "coco"
    evaluator = build_evaluator(cfg, name)
    assert isinstance(evaluator, FastCOCOEvaluator) and evaluator._compiled is compiled_cocoeval()


def test_datasets_with_string_image_ids_give_the_same_ap(tmp_path):
    """The compiled COCOeval takes numeric ids only; Detectron2 datasets (the demo's) may name images by string."""
    import json

    json_file, predictions = synthetic_coco(str(tmp_path), num_images=6, instances=5, size=(48, 64), seed=5)
    with open(json_file) as f:
        data = json.load(f)
    for image in data["images"]:
        image["id"] = f"scene_{image['id']:03d}"
    for annotation in data["annotations"]:
        annotation["image_id"] = f"scene_{annotation['image_id']:03d}"
    named = tmp_path / "named.json"
    named.write_text(json.dumps(data))
    name = "test_coco_eval_string_ids"
    register_synthetic(name, str(named))
    named_predictions = [(f"scene_{image_id:03d}", instances) for image_id, instances in predictions()]
    evaluator, fast = _evaluate(name, named_predictions)
    assert evaluator._compiled is compiled_cocoeval()
    _, slow = _evaluate(name, named_predictions, compiled=False)
    assert 5 < fast["segm"]["AP"] < 95
    assert same_results(fast, slow), (fast, slow)
