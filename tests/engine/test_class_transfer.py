"""Class-transfer weight loading: rows remapped by class name, new classes fresh, no-object row kept."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from selftrain_d2.config import load_config
from selftrain_d2.engine import Trainer
from selftrain_d2.engine.checkpoint import (
    Checkpointer,
    ClassTransferCheckpointer,
    build_checkpointer,
    target_classes_of,
    transfer_class_weights,
)

from ..conftest import ROOT

SOURCE = ["road", "car", "person"]
TARGET = ["car", "sky", "road", "bus"]


def _rows(n, dim, offset):
    """Row i filled with offset + i, so every row says where it came from."""
    return (torch.arange(n, dtype=torch.float32)[:, None] + offset).expand(n, dim).clone()


def test_deeplab_like_predictor_conv():
    ckpt = {
        "sem_seg_head.predictor.weight": _rows(3, 4, 10.0).view(3, 4, 1, 1),
        "sem_seg_head.predictor.bias": torch.tensor([10.0, 11.0, 12.0]),
        "backbone.stem.weight": _rows(3, 4, 50.0).view(3, 4, 1, 1),  # 3 rows too, but not class-sized in the model
    }
    model = {
        "sem_seg_head.predictor.weight": _rows(4, 4, -1.0).view(4, 4, 1, 1),
        "sem_seg_head.predictor.bias": torch.tensor([-1.0, -2.0, -3.0, -4.0]),
        "backbone.stem.weight": torch.zeros(3, 4, 1, 1),
    }
    out, report = transfer_class_weights(ckpt, model, SOURCE, TARGET)
    # car <- source row 1, sky fresh (model row 1), road <- source row 0, bus fresh (model row 3).
    assert out["sem_seg_head.predictor.weight"][:, :, 0, 0][:, 0].tolist() == [11.0, 0.0, 10.0, 2.0]
    assert out["sem_seg_head.predictor.bias"].tolist() == [11.0, -2.0, 10.0, -4.0]
    assert out["backbone.stem.weight"] is ckpt["backbone.stem.weight"]
    assert [r["key"] for r in report] == ["sem_seg_head.predictor.weight", "sem_seg_head.predictor.bias"]
    assert report[0]["copied"] == [(0, 1), (2, 0)] and report[0]["new"] == ["sky", "bus"]
    assert report[0]["source_shape"] == (3, 4, 1, 1) and report[0]["target_shape"] == (4, 4, 1, 1)
    assert not report[0]["no_object"]
    assert ckpt["sem_seg_head.predictor.bias"].tolist() == [10.0, 11.0, 12.0]  # input not modified


def test_mask_former_class_embed_keeps_no_object_row():
    ckpt = {
        "module.sem_seg_head.predictor.class_embed.weight": _rows(4, 2, 20.0),  # 3 classes + no-object (row 3)
        "module.sem_seg_head.predictor.class_embed.bias": torch.tensor([20.0, 21.0, 22.0, 23.0]),
        "module.criterion.empty_weight": torch.tensor([1.0, 1.0, 1.0, 0.1]),
        "module.sem_seg_head.predictor.query_feat.weight": _rows(4, 2, 30.0),  # 4 queries: left alone
    }
    model = {
        "sem_seg_head.predictor.class_embed.weight": torch.zeros(5, 2),
        "sem_seg_head.predictor.class_embed.bias": torch.full((5,), -7.0),
        "criterion.empty_weight": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5]),
        "sem_seg_head.predictor.query_feat.weight": torch.zeros(4, 2),
    }
    source = ["Road", "Car ", "person"]  # names compare ignoring case and surrounding spaces
    out, report = transfer_class_weights(ckpt, model, source, TARGET)
    assert out["module.sem_seg_head.predictor.class_embed.weight"][:, 0].tolist() == [21.0, 0.0, 20.0, 0.0, 23.0]
    assert out["module.sem_seg_head.predictor.class_embed.bias"].tolist() == [21.0, -7.0, 20.0, -7.0, 23.0]
    assert out["module.criterion.empty_weight"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1])
    key = "module.sem_seg_head.predictor.query_feat.weight"
    assert out[key] is ckpt[key]
    assert all(r["no_object"] for r in report) and len(report) == 3


def test_duplicate_names_are_an_error():
    with pytest.raises(ValueError, match="'Car' twice"):
        transfer_class_weights({}, {}, ["car", "Car"], TARGET)


class _Head(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.predictor = nn.Conv2d(2, n, 1)


def test_checkpointer_remaps_new_runs_but_not_resumes(tmp_path):
    source, target = ["a", "b", "c"], ["c", "b", "a"]  # same count: only names tell the rows apart
    src_model = _Head(3)
    for d in ("src", "run"):
        (tmp_path / d).mkdir()
    DetectionCheckpointer(src_model, str(tmp_path / "src")).save("source")
    weights = str(tmp_path / "src" / "source.pth")

    model = _Head(3)
    ckpt = ClassTransferCheckpointer(model, str(tmp_path / "run"), source_classes=source, target_classes=target)
    ckpt.resume_or_load(weights, resume=True)  # nothing to resume yet: a new run, remapped
    torch.testing.assert_close(model.predictor.bias, src_model.predictor.bias.flip(0))
    assert ckpt.transfer_report[0]["copied"] == [(0, 2), (1, 1), (2, 0)]

    ckpt.save("model_0000001")  # the run's own checkpoint, in target order
    saved = model.predictor.bias.detach().clone()
    with torch.no_grad():
        model.predictor.bias.zero_()
    ckpt.transfer_report = None
    ckpt.resume_or_load(weights, resume=True)
    torch.testing.assert_close(model.predictor.bias, saved)  # loaded as saved, not flipped again
    assert ckpt.transfer_report is None


def test_build_checkpointer_from_config():
    cfg = load_config(None, ["DATASETS.TRAIN", "('demo_rural_labeled_sem_seg',)"])
    assert type(build_checkpointer(cfg, _Head(3), "")) is Checkpointer  # atomic saves, safe loads
    cfg.MODEL.CLASS_TRANSFER.SOURCE_CLASSES = SOURCE
    ckpt = build_checkpointer(cfg, _Head(3), "")
    assert isinstance(ckpt, ClassTransferCheckpointer) and ckpt.target_classes[-2:] == ["terrain", "truck"]
    assert target_classes_of("demo_rural_labeled_instance") == ["car", "person", "bicycle", "truck"]
    cfg.DATASETS.TRAIN = ()
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        build_checkpointer(cfg, _Head(3), "")


def test_trainer_starts_rural_finetuning_from_city_weights(tmp_path):
    """City Fast-SCNN (10 classes) -> rural (12: + terrain, truck): shared rows kept, new ones fresh."""
    config = os.path.join(ROOT, "configs", "demo", "fast-scnn.yaml")
    city = load_config(config, ["SOLVER.IMS_PER_BATCH", "2"])
    from detectron2.modeling import build_model

    city_model = build_model(city)
    DetectionCheckpointer(city_model, str(tmp_path)).save("city")
    city_classes = list(target_classes_of("demo_city_labeled_sem_seg"))
    cfg = load_config(config, [
        "DATASETS.TRAIN", "('demo_rural_labeled_sem_seg',)", "DATASETS.TEST", "()",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "12", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path / "ft"),
        "MODEL.WEIGHTS", str(tmp_path / "city.pth"), "MODEL.CLASS_TRANSFER.SOURCE_CLASSES", str(city_classes),
    ])
    trainer = Trainer(cfg)
    fresh = trainer.model.classifier[3].weight.detach().clone()
    trainer.resume_or_load(resume=False)
    got = trainer.model.classifier[3].weight.detach()
    torch.testing.assert_close(got[:10], city_model.classifier[3].weight)  # rural lists the city classes first
    torch.testing.assert_close(got[10:], fresh[10:])
    torch.testing.assert_close(trainer.model.classifier[0][0].weight, city_model.classifier[0][0].weight)
