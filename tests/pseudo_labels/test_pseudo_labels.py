"""Offline pseudo labels: storage round trips, TTA maths, the resumable generator and registration."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from selftrain_d2.data.datasets import register_from_cfg
from selftrain_d2.pseudo_labels import (
    generate_pseudo_labels, load_confidence, load_hard_label, multi_scale_flip, read_soft_label,
    sliding_window, soft_label_to_dense, storage, write_hard_label, write_soft_label,
)
from selftrain_d2.pseudo_labels.generate import scores_to_probabilities, teacher_output

from ..helpers import BoxTeacher, ColourTeacher, colour_probs, pseudo_label_cfg


def _mtimes(root, sub):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, sub)):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_ino, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------- storage


def test_hard_label_threshold_and_round_trip(tmp_path):
    probs = np.array([[[0.7, 0.2], [0.5, 0.0]], [[0.3, 0.8], [0.5, 1.0]]], dtype=np.float32)  # [2, 2, 2]
    label, conf = storage.hard_label_from_probs(probs, threshold=0.75)
    # argmax (ties -> the lower id); 255 where the top probability is under 0.75
    np.testing.assert_array_equal(label, [[255, 1], [255, 1]])
    np.testing.assert_allclose(conf, [[0.7, 0.8], [0.5, 1.0]])
    np.testing.assert_array_equal(storage.hard_label_from_probs(probs, 0.0)[0], [[0, 1], [0, 1]])

    write_hard_label(tmp_path / "a" / "l.png", label)
    back = load_hard_label(tmp_path / "a" / "l.png")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)

    storage.write_confidence(tmp_path / "c.png", conf)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c.png")), [[178, 204], [128, 255]])
    np.testing.assert_allclose(load_confidence(tmp_path / "c.png"), conf, atol=0.5 / 255)

    with pytest.raises(ValueError, match="uint8 PNG"):
        storage.hard_label_from_probs(np.ones((256, 1, 1)) / 256)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_soft_label_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.random((5, 4, 3)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    write_soft_label(tmp_path / "s.npz", probs, top_k=2)
    with np.load(tmp_path / "s.npz") as raw:
        assert raw["indices"].dtype == np.uint8 and raw["probs"].dtype == np.float16
        assert raw["indices"].shape == (2, 4, 3)
    soft = read_soft_label(tmp_path / "s.npz")
    order = np.argsort(-probs, axis=0)[:2]
    np.testing.assert_array_equal(soft["indices"], order)
    np.testing.assert_allclose(soft["probs"], np.take_along_axis(probs, order, 0), rtol=1e-3)
    dense = soft_label_to_dense(soft)
    expected = np.zeros_like(probs)
    np.put_along_axis(expected, order, np.take_along_axis(probs, order, 0), 0)
    np.testing.assert_allclose(dense, expected, rtol=1e-3)

    # more than 256 classes -> uint16 indices; top-k above the class count keeps them all
    many = np.zeros((300, 1, 2), np.float32)
    many[299, 0, 0] = many[3, 0, 1] = 1.0
    write_soft_label(tmp_path / "m.npz", many, top_k=1)
    soft = read_soft_label(tmp_path / "m.npz")
    assert soft["indices"].dtype == np.uint16 and soft["num_classes"] == 300
    np.testing.assert_array_equal(soft["indices"][0], [[299, 3]])
    with pytest.raises(OSError, match="bad.npz"):
        read_soft_label(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------------------- TTA


def test_flip_and_scale_averaging_by_hand():
    # predict: class 0 score = column index (depends on position, so flips matter), class 1 = 1 - that.
    def predict(img):
        w = img.shape[-1]
        col = torch.arange(w, dtype=torch.float32).expand(img.shape[-2], w) / max(w - 1, 1)
        return torch.stack([col, 1 - col])

    image = torch.zeros(3, 4, 4)
    flip_avg = multi_scale_flip(predict, image, scales=[1.0], flip=True)
    # prediction of the mirror image mirrored back is 1 - col: the mean is 0.5 everywhere
    torch.testing.assert_close(flip_avg, torch.full((2, 4, 4), 0.5))

    # scale 0.5: 2 columns [0, 1] upsampled bilinearly (align_corners=False) to 4 -> [0, .25, .75, 1]
    scaled = multi_scale_flip(predict, image, scales=[0.5, 1.0], flip=False)
    expected0 = (torch.tensor([0.0, 0.25, 0.75, 1.0]) + torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])) / 2
    torch.testing.assert_close(scaled[0], expected0.expand(4, 4))
    torch.testing.assert_close(scaled[1], (1 - expected0).expand(4, 4))

    # out_size: predictions are resized before averaging
    assert multi_scale_flip(predict, image, [1.0], out_size=(8, 2)).shape == (2, 8, 2)


def test_sliding_window_equals_full_for_pointwise_model():
    calls = []

    def predict(img):
        calls.append(tuple(img.shape[-2:]))
        return torch.stack([img[0] * 2, img[1] + img[2]]).float()

    image = torch.rand(3, 13, 21)
    full = predict(image)
    calls.clear()
    windowed = sliding_window(predict, image, window=(8, 8), stride=(5, 6))
    torch.testing.assert_close(windowed, full)
    # rows: starts 0, 5 (ends at 13); columns: 0, 6, 12, 13 (last one flush with the border)
    assert len(calls) == 2 * 4 and set(calls) == {(8, 8)}
    # an image smaller than the window is padded (with the given per-channel value) and the padding cut off
    calls.clear()
    small = torch.rand(3, 5, 6)
    seen = []
    padded = sliding_window(lambda x: (seen.append(x.clone()), predict(x))[1], small, (8, 8), (4, 4), [1.0, 2.0, 3.0])
    assert calls == [(8, 8)] and [seen[0][c, 5:, :].unique().tolist() for c in range(3)] == [[1.0], [2.0], [3.0]]
    torch.testing.assert_close(padded, predict(small))
    with pytest.raises(ValueError, match="stride 9 exceeds the window size 8"):
        sliding_window(predict, image, window=(8, 8), stride=(9, 4))


# ------------------------------------------------------------------------------------------- the generator


def test_semantic_teacher_kinds():
    assert teacher_output(pseudo_label_cfg("SemanticSegmentor")) == ("semantic", "logits")
    assert teacher_output(pseudo_label_cfg("Mask2FormerInstance")) == ("instance", None)
    logits = torch.tensor([[[0.0]], [[np.log(3.0)]]])
    torch.testing.assert_close(scores_to_probabilities(logits, "logits").flatten(), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(scores_to_probabilities(logits.exp(), "scores").flatten(), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="NoSuchArch.*register_teacher_output"):
        teacher_output(pseudo_label_cfg("NoSuchArch"))


def test_generate_hard_labels_skips_unreadable(tmp_path, images, capsys):
    folder, arrays = images
    cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.THRESHOLD", "0.5", "OFFLINE_PSEUDO_LABELS.SAVE_CONFIDENCE", "True")
    out = tmp_path / "out"
    report = generate_pseudo_labels(cfg, str(folder), out, model=ColourTeacher())
    assert report["images"] == 6 and report["written"] == 5 and report["already_done"] == 0
    assert [s["file"] for s in report["skipped"]] == [str(folder / "broken.png")]
    assert report["skipped"][0]["error"].startswith("UnidentifiedImageError: cannot identify image file")
    assert "1 unreadable images skipped" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text()) == report

    for key, arr in arrays.items():
        probs = colour_probs(arr)
        expected = probs.argmax(0).astype(np.uint8)
        expected[probs.max(0) < 0.5] = 255
        np.testing.assert_array_equal(load_hard_label(out / "labels" / f"{key}.png"), expected)
        np.testing.assert_allclose(load_confidence(out / "confidence" / f"{key}.png"), probs.max(0), atol=0.51 / 255)
    assert (load_hard_label(out / "labels" / "img0.png") == 255).any()  # the threshold did something

    dataset = json.loads((out / "dataset.json").read_text())
    assert [d["image_id"] for d in dataset] == ["img0", "img1", "img2", "img3", "sub/img4"]
    assert dataset[4] == {
        "file_name": str(folder / "sub" / "img4.png"), "image_id": "sub/img4", "height": 6, "width": 10,
        "sem_seg_file_name": str(out / "labels" / "sub" / "img4.png"),
        "confidence_file_name": str(out / "confidence" / "sub" / "img4.png"),
    }
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stuff_classes"] == ["0", "1", "2"] and meta["ignore_label"] == 255 and meta["threshold"] == 0.5


def test_resume_after_kill_and_rerun_does_nothing(tmp_path, images, monkeypatch):
    folder, arrays = images
    weights = tmp_path / "teacher.pth"
    torch.save({"model": ColourTeacher().state_dict()}, weights)
    # One writer thread, so that the kill comes after exactly two label files.
    cfg = pseudo_label_cfg("ColourTeacher", "MODEL.WEIGHTS", str(weights), "OFFLINE_PSEUDO_LABELS.FORMAT", "soft",
               "DATALOADER.NUM_WORKERS", "0")
    out = tmp_path / "out"
    real_write = storage.write_hard_label
    written = []

    def killing_write(path, label, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(path, label, **kwargs)
        written.append(os.path.relpath(path, out))

    monkeypatch.setattr(storage, "write_hard_label", killing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_pseudo_labels(cfg, str(folder), out)
    assert written == ["labels/img0.png", "labels/img1.png"]
    assert not (out / "report.json").exists()
    before = _mtimes(out, "labels")
    before.update(_mtimes(out, "soft"))

    written.clear()
    def counting_write(path, label, **kwargs):
        real_write(path, label, **kwargs)
        written.append(os.path.relpath(path, out))

    monkeypatch.setattr(storage, "write_hard_label", counting_write)
    report = generate_pseudo_labels(cfg, str(folder), out)
    assert written == ["labels/img2.png", "labels/img3.png", "labels/sub/img4.png"]
    assert report["written"] == 3 and report["already_done"] == 2 and len(report["skipped"]) == 1
    after = _mtimes(out, "labels")
    for path in ("labels/img0.png", "labels/img1.png", "soft/img0.npz", "soft/img1.npz"):
        assert after.get(path, _mtimes(out, "soft").get(path)) == before[path], path
    for key, arr in arrays.items():
        soft = read_soft_label(out / "soft" / f"{key}.npz")
        np.testing.assert_array_equal(soft["indices"][0], load_hard_label(out / "labels" / f"{key}.png"))
        np.testing.assert_allclose(soft_label_to_dense(soft), colour_probs(arr), rtol=2e-3)

    written.clear()
    snapshot = {**_mtimes(out, "labels"), **_mtimes(out, "soft")}
    report = generate_pseudo_labels(cfg, str(folder), out)
    assert written == [] and report["written"] == 0 and report["already_done"] == 5
    assert {**_mtimes(out, "labels"), **_mtimes(out, "soft")} == snapshot

    # a deleted label is made again; other settings in the same folder are refused
    os.unlink(out / "labels" / "img3.png")
    assert generate_pseudo_labels(cfg, str(folder), out)["written"] == 1 and written == ["labels/img3.png"]
    cfg.OFFLINE_PSEUDO_LABELS.FORMAT = "hard"
    with pytest.raises(ValueError, match="meta.json.*settings"):
        generate_pseudo_labels(cfg, str(folder), out)


def test_progress_line_cut_by_kill_is_ignored(tmp_path, images):
    folder, _ = images
    out = tmp_path / "out"
    generate_pseudo_labels(pseudo_label_cfg(), str(folder), out, model=ColourTeacher())
    log = out / "progress" / "rank0.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]) + lines[2][:7])  # third record cut short, no newline
    teacher = ColourTeacher()
    report = generate_pseudo_labels(pseudo_label_cfg(), str(folder), out, model=teacher)
    assert report["written"] == 3 and teacher.calls == 3
    # Writer threads record images as they finish, not necessarily in input order.
    kept = {json.loads(line)["key"] for line in lines[:2]}
    redone = [json.loads(line)["key"] for line in log.read_text().splitlines()[3:]]
    assert sorted(redone) == sorted({"img0", "img1", "img2", "img3", "sub/img4"} - kept)


def test_shards_by_rank(tmp_path, images, monkeypatch):
    from detectron2.utils import comm

    folder, _ = images
    out = tmp_path / "out"
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda data, group=None: [data])
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    generate_pseudo_labels(pseudo_label_cfg(), str(folder), out, model=ColourTeacher())
    # inputs sorted: broken, img0, img1, img2, img3, sub/img4 -> rank 1 takes indices 1, 3, 5
    assert sorted(_mtimes(out, "labels")) == ["labels/img0.png", "labels/img2.png", "labels/sub/img4.png"]
    assert not (out / "dataset.json").exists()
    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    report = generate_pseudo_labels(pseudo_label_cfg(), str(folder), out, model=ColourTeacher())
    assert report["written"] == 2 and [s["file"] for s in report["skipped"]] == [str(folder / "broken.png")]
    assert len(json.loads((out / "dataset.json").read_text())) == 5


def test_tta_and_sliding_window_in_generator(tmp_path, images):
    folder, arrays = images
    cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.TTA.FLIP", "True", "OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.ENABLED", "True",
               "OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.SIZE", "[4, 4]", "OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.STRIDE", "[2, 3]",
               "OFFLINE_PSEUDO_LABELS.FORMAT", "soft", "OFFLINE_PSEUDO_LABELS.SOFT_TOP_K", "3")
    generate_pseudo_labels(cfg, str(folder), tmp_path / "out", model=ColourTeacher())
    # a pointwise model: windows and mirrored copies give exactly the plain probabilities
    for key, arr in arrays.items():
        dense = soft_label_to_dense(read_soft_label(tmp_path / "out" / "soft" / f"{key}.npz"))
        np.testing.assert_allclose(dense, colour_probs(arr), rtol=2e-3)


def test_register_from_dir_with_source_metadata(tmp_path, images, new_name):
    folder, arrays = images
    source = new_name("src")
    DatasetCatalog.register(source, lambda: [
        {"file_name": str(folder / f"img{i}.png"), "image_id": f"img{i}", "height": 6, "width": 10} for i in range(2)
    ])
    MetadataCatalog.get(source).set(stuff_classes=["red", "green", "blue"], stuff_colors=[[255, 0, 0]] * 3)
    out = tmp_path / "pl"
    name = new_name("pseudo")
    cfg = pseudo_label_cfg()
    cfg.DATASETS.PSEUDO_LABEL_FOLDERS = [[name, str(out)]]
    with pytest.raises(FileNotFoundError, match="no dataset.json; run tools/generate_pseudo_labels.py"):
        register_from_cfg(cfg)

    generate_pseudo_labels(cfg, source, out, model=ColourTeacher())
    assert register_from_cfg(cfg) == [name]
    assert register_from_cfg(cfg) == [name]  # idempotent
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == ["img0", "img1"]
    np.testing.assert_array_equal(
        load_hard_label(dicts[1]["sem_seg_file_name"]), colour_probs(arrays["img1"]).argmax(0)
    )
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == ["red", "green", "blue"] and meta.evaluator_type == "sem_seg"
    assert meta.ignore_label == 255 and meta.stuff_colors == [[255, 0, 0]] * 3


def test_instance_pseudo_labels_coco_rle(tmp_path, images, new_name):
    from pycocotools import mask as mask_util

    folder, _ = images
    source = new_name("inst")
    DatasetCatalog.register(source, lambda: [{"file_name": str(folder / "img0.png"), "image_id": 7}])
    MetadataCatalog.get(source).set(thing_classes=["car", "person"], thing_dataset_id_to_contiguous_id={3: 0, 5: 1})
    out = tmp_path / "inst"
    cfg = pseudo_label_cfg("BoxTeacher", "OFFLINE_PSEUDO_LABELS.INSTANCE_SCORE_THRESHOLD", "0.5")
    report = generate_pseudo_labels(cfg, source, out, model=BoxTeacher())
    assert report["written"] == 1
    coco = json.loads((out / "instances.json").read_text())
    assert coco["categories"] == [{"id": 3, "name": "car"}, {"id": 5, "name": "person"}]
    assert coco["images"][0]["height"] == 6 and coco["images"][0]["key"] == "7"
    [ann] = coco["annotations"]  # the 0.3-scoring instance is under the threshold
    assert ann["category_id"] == 5 and ann["score"] == pytest.approx(0.9) and ann["area"] == 6
    assert ann["bbox"] == [2.0, 1.0, 3.0, 2.0]
    expected = np.zeros((6, 10), np.uint8)
    expected[1:3, 2:5] = 1
    rle = {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
    np.testing.assert_array_equal(mask_util.decode(rle), expected)

    name = new_name("instpl")
    from selftrain_d2.pseudo_labels import register_pseudo_label_dataset

    register_pseudo_label_dataset(name, out)
    [record] = DatasetCatalog.get(name)
    assert record["annotations"][0]["category_id"] == 1  # contiguous again
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {3: 0, 5: 1}
    with pytest.raises(ValueError, match="semantic teachers only"):
        cfg = pseudo_label_cfg("BoxTeacher", "OFFLINE_PSEUDO_LABELS.TTA.FLIP", "True")
        generate_pseudo_labels(cfg, source, tmp_path / "x", model=BoxTeacher())
