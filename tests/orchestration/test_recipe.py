"""Recipe files, stage caching and resume, and the label statistics of the report."""
import json
import os

import numpy as np
import pytest

from selftrain_d2.evaluation.label_statistics import (
    class_pixel_counts,
    confusion_matrix,
    quality_from_confusion,
)
from selftrain_d2.orchestration.recipe import STAGE_REGISTRY, RecipeError, Stage, parse_recipe, run_recipe
from selftrain_d2.orchestration.recipe.report import metrics_table

RUNS = []  # (stage name, resume) of every FakeStage.run call


class Killed(Exception):
    pass


@STAGE_REGISTRY.register("fake_test_stage")
class FakeStage(Stage):
    """Writes value + the values of its inputs; ``fail_at`` kills it after writing a partial file."""

    REQUIRED = ("value",)
    OPTIONAL = ("model", "fail")
    REFS = ("model",)

    def fingerprint(self):
        return {"value": self.options["value"]}

    def run(self, out_dir, resume):
        RUNS.append((self.spec.name, resume))
        with open(os.path.join(out_dir, "partial.txt"), "a") as f:
            f.write("x")
        if self.options.get("fail") and not os.environ.get("FAKE_STAGE_NO_FAIL"):
            raise Killed(self.spec.name)
        upstream = self.ctx.results[self.options["model"]]["value"] if self.options.get("model") else 0
        with open(os.path.join(out_dir, "value.json"), "w") as f:
            json.dump({"value": self.options["value"] + upstream}, f)

    def collect(self, out_dir):
        with open(os.path.join(out_dir, "value.json")) as f:
            value = json.load(f)["value"]
        return {"dir": out_dir, "value": value, "metrics": {"fake": {"value": float(value)}}}


def _recipe(teacher=1, student=10, fail=False):
    raw = {
        "name": "fake",
        "stages": {
            "teacher": {"type": "fake_test_stage", "value": teacher},
            "student": {"type": "fake_test_stage", "value": student, "model": "teacher", "fail": fail},
        },
    }
    return parse_recipe(raw, "fake.yaml")


def test_recipe_runs_stages_in_order_and_writes_summary(tmp_path):
    RUNS.clear()
    summary = run_recipe(_recipe(), tmp_path, report=False)
    assert RUNS == [("teacher", False), ("student", False)]
    assert summary == {"teacher": {"fake": {"value": 1.0}}, "student": {"fake": {"value": 11.0}}}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_recipe_skips_done_stages_and_reruns_changed_ones(tmp_path):
    RUNS.clear()
    run_recipe(_recipe(), tmp_path, report=False)
    RUNS.clear()
    run_recipe(_recipe(), tmp_path, report=False)
    assert RUNS == []  # everything cached
    # An upstream change reruns the stage and everything downstream; old results are moved aside.
    summary = run_recipe(_recipe(teacher=2), tmp_path, report=False)
    assert RUNS == [("teacher", False), ("student", False)]
    assert summary["student"]["fake"]["value"] == 12.0
    stale = sorted(p.name.split(".stale-")[0] for p in tmp_path.iterdir() if ".stale-" in p.name)
    assert stale == ["student", "teacher"]
    # A change in the last stage only reruns that one.
    RUNS.clear()
    run_recipe(_recipe(teacher=2, student=20), tmp_path, report=False)
    assert RUNS == [("student", False)]


def test_killed_recipe_resumes_the_interrupted_stage(tmp_path, monkeypatch):
    RUNS.clear()
    with pytest.raises(Killed):
        run_recipe(_recipe(fail=True), tmp_path, report=False)
    assert RUNS == [("teacher", False), ("student", False)]
    assert not (tmp_path / "summary.json").exists()
    RUNS.clear()
    monkeypatch.setenv("FAKE_STAGE_NO_FAIL", "1")
    summary = run_recipe(_recipe(fail=True), tmp_path, report=False)
    assert RUNS == [("student", True)]  # teacher skipped, student resumed in its own folder
    assert (tmp_path / "student" / "partial.txt").read_text() == "xx"
    assert summary["student"]["fake"]["value"] == 11.0


def test_recipe_errors_name_the_stage_and_key():
    with pytest.raises(RecipeError, match="unknown type 'trian'"):
        parse_recipe({"stages": {"teacher": {"type": "trian", "config": "x.yaml"}}}, "r.yaml")
    with pytest.raises(RecipeError, match="'student'.*model: 'nope' must name an earlier stage"):
        parse_recipe({"stages": {"student": {"type": "fake_test_stage", "value": 1, "model": "nope"}}}, "r.yaml")
    with pytest.raises(RecipeError, match=r"stage 'teacher'.*unknown \['confg'\]"):
        parse_recipe({"stages": {"teacher": {"type": "train", "confg": "x.yaml"}}}, "r.yaml")
    with pytest.raises(RecipeError, match="unknown top-level keys"):
        parse_recipe({"stages": {"t": {"type": "fake_test_stage", "value": 1}}, "stagse": {}}, "r.yaml")


def test_loops_expand_with_each_student_teaching_the_next():
    raw = {
        "stages": {
            "teacher": {"type": "fake_test_stage", "value": 1},
            "student": {"type": "fake_test_stage", "value": 10, "model": "teacher"},
        },
        "loops": 3,
        "loop": {"stages": ["student"], "teacher": "student"},
    }
    recipe = parse_recipe(raw, "r.yaml")
    assert [s.name for s in recipe.stages] == ["teacher", "student", "student_loop2", "student_loop3"]
    assert recipe.stage("student_loop2").options["model"] == "student"
    assert recipe.stage("student_loop3").options["model"] == "student_loop2"


def test_confusion_and_quality_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 255], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, gt, 3)
    # rows gt 0..2, cols pred 0..2 + uncovered
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0]]
    q = quality_from_confusion(conf, ["a", "b", "c"])
    assert q["coverage"] == pytest.approx(100 * 6 / 7)
    assert q["pACC"] == pytest.approx(100 * 4 / 6)
    # IoU a: tp 1 / (pred 2 + gt 2 - 1) = 1/3; b: 2 / (3 + 2 - 2) = 2/3; c: 1 / (1 + 2 - 1) = 1/2
    assert q["IoU-a"] == pytest.approx(100 / 3)
    assert q["IoU-b"] == pytest.approx(200 / 3)
    assert q["IoU-c"] == pytest.approx(50)
    assert q["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert class_pixel_counts(gt, 3).tolist() == [2, 3, 2]


def test_metrics_table_has_a_column_per_stage_and_per_class_rows():
    summary = {
        "teacher": {"sem_seg": {"mIoU": 50.0, "IoU-road": 90.0}},
        "student": {"sem_seg": {"mIoU": 55.5, "IoU-road": 91.0}},
    }
    table = metrics_table(summary).splitlines()
    assert table[0] == "| metric | teacher | student |"
    assert "| sem_seg/mIoU | 50.00 | 55.50 |" in table
    assert "| sem_seg/IoU-road | 90.00 | 91.00 |" in table


@pytest.mark.slow
def test_self_training_recipe_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    """teacher -> pseudo labels (a folder of 3 images) -> centroid index -> student, with tiny settings; the
    second run starts no subprocess."""
    from detectron2.data import DatasetCatalog

    from selftrain_d2.orchestration.recipe import stages

    from ..conftest import DEMO_CONFIG, FAST_TRAIN_OPTS

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for record in DatasetCatalog.get("demo_city_unlabeled_sem_seg")[:3]:
        os.symlink(record["file_name"], folder / os.path.basename(record["file_name"]))
    opts = FAST_TRAIN_OPTS + ["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "MODEL.EFFICIENTNET_LITE.PRETRAINED",
                              "False"]
    raw = {
        "name": "tiny",
        "stages": {
            "teacher": {"type": "train", "config": DEMO_CONFIG, "opts": opts},
            "pseudo_labels": {"type": "pseudo_labels", "model": "teacher", "input": str(folder)},
            "centroids": {"type": "centroid_index", "labels": "pseudo_labels", "min_area": 4},
            "student": {"type": "train", "config": DEMO_CONFIG, "pseudo_labels": ["pseudo_labels"],
                        "centroids": ["centroids"],
                        "opts": opts + ["DATALOADER.PSEUDO_RATIO", "1.0", "DATALOADER.CENTROID_SAMPLING.ENABLED", "True"]},
        },
    }
    recipe = parse_recipe(raw, str(tmp_path / "tiny.yaml"))
    out = tmp_path / "out"
    run_recipe(recipe, out)
    assert (out / "teacher" / "model_final.pth").is_file()
    records = json.loads((out / "pseudo_labels" / "dataset.json").read_text())
    assert len(records) == 3 and all(os.path.isfile(r["sem_seg_file_name"]) for r in records)
    assert (out / "centroids" / "centroids.npz").is_file()
    student_cfg = (out / "student" / "config.yaml").read_text()
    assert "recipe_pseudo_labels" in student_cfg and "centroids.npz" in student_cfg
    assert (out / "student" / "model_final.pth").is_file()
    assert (out / "report.md").is_file()

    calls = []
    monkeypatch.setattr(stages, "_run", lambda cmd, what: calls.append(what))
    run_recipe(recipe, out)
    assert calls == []


def test_stage_hash_depends_on_settings_not_on_unrelated_defaults(monkeypatch):
    from selftrain_d2.orchestration.recipe.stages import config_delta

    from ..conftest import DEMO_CONFIG

    base = config_delta(DEMO_CONFIG, [])
    assert "SOLVER.MAX_ITER: 300" in base and not any(line.startswith("SOLVER.MOMENTUM") for line in base)
    assert config_delta(DEMO_CONFIG, ["SOLVER.MAX_ITER", "10"]) != base
    assert config_delta(DEMO_CONFIG, ["SOLVER.MOMENTUM", "0.9"]) == base  # the default: no change


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    from selftrain_d2.orchestration.recipe.runner import output_lock

    with output_lock(str(tmp_path)):
        with pytest.raises(RecipeError, match="another recipe run is using"):
            run_recipe(_recipe(), tmp_path, report=False)
    run_recipe(_recipe(), tmp_path, report=False)  # free again
