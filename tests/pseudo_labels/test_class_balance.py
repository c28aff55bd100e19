"""Class-balanced pseudo labels: the offset fit, its application, the labelled shares and the generator."""
import json
import socket
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from selftrain_d2.pseudo_labels import class_balance, generate_pseudo_labels, load_hard_label

from ..helpers import ColourTeacher, colour_probs, pseudo_label_cfg, run_together


def _under_predicting_teacher(n=30000, seed=0):
    """Probabilities [n, 3] of pixels whose true classes have shares 0.5 / 0.3 / 0.2, from a teacher that
    favours class 0: class 2 wins far fewer than 20 % of the pixels."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    logits = rng.normal(0.0, 1.0, size=(n, 3)) + 1.5 * np.eye(3)[truth] + np.array([0.8, 0.0, -0.8])
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True)


def test_offsets_reach_the_target_shares():
    probs = _under_predicting_teacher()
    before = class_balance.argmax_shares(np.log(probs), np.zeros(3))
    assert before[2] < 0.12 and before[0] > 0.6  # the bias the offsets must undo
    offsets, shares = class_balance.fit_class_offsets(probs, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], rtol=0.05)
    assert offsets[2] > offsets[1] > offsets[0] and abs(offsets.sum()) < 1e-9
    # applied to a probability map, the offsets give the fitted shares
    balanced = class_balance.apply_class_offsets(torch.from_numpy(probs.T.copy()).float()[:, :, None], offsets)
    counts = np.bincount(balanced.argmax(0).flatten().numpy(), minlength=3) / len(probs)
    np.testing.assert_allclose(counts, shares, atol=1e-3)


def test_offsets_stay_finite_for_a_class_absent_from_the_target():
    probs = _under_predicting_teacher(3000)
    offsets, shares = class_balance.fit_class_offsets(probs, [0.6, 0.4, 0.0])
    assert np.isfinite(offsets).all() and shares[2] == 0.0
    with pytest.raises(ValueError, match="target shares must be 3 non-negative"):
        class_balance.fit_class_offsets(probs, [0.5, 0.5])


def test_apply_offsets_by_hand():
    probs = torch.tensor([[0.6, 0.2], [0.3, 0.3], [0.1, 0.5]])[:, None, :]  # [C=3, H=1, W=2]
    out = class_balance.apply_class_offsets(probs, np.log([1.0, 1.0, 4.0]))
    # pixel 0: (0.6, 0.3, 0.4) / 1.3; pixel 1: (0.2, 0.3, 2.0) / 2.5
    np.testing.assert_allclose(out[:, 0, 0], [0.6 / 1.3, 0.3 / 1.3, 0.4 / 1.3], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 1], [0.08, 0.12, 0.8], rtol=1e-6)


def test_labelled_shares_and_a_bad_label_named(tmp_path):
    a, b = np.array([[0, 0, 1], [2, 255, 255]], np.uint8), np.array([[1, 1, 1], [1, 0, 255]], np.uint8)
    records = []
    for name, label in (("a", a), ("b", b)):
        Image.fromarray(label).save(tmp_path / f"{name}.png")
        records.append({"file_name": f"{name}.jpg", "sem_seg_file_name": str(tmp_path / f"{name}.png")})
    # 9 labelled pixels: class 0 x3, class 1 x5, class 2 x1
    np.testing.assert_allclose(class_balance.label_class_shares(records, 3, 255), [3 / 9, 5 / 9, 1 / 9])
    Image.fromarray(np.array([[0, 7]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad\.png.*\[7\]"):
        class_balance.label_class_shares([{"sem_seg_file_name": str(tmp_path / "bad.png")}], 3, 255)
    with pytest.raises(ValueError, match="img.jpg has no sem_seg_file_name"):
        class_balance.label_class_shares([{"file_name": "img.jpg"}], 3, 255)


def _label_shares(out, keys):
    labels = np.concatenate([load_hard_label(out / "labels" / f"{k}.png").ravel() for k in keys])
    return np.bincount(labels, minlength=3) / labels.size


def test_generator_balances_and_resumes_with_the_same_offsets(tmp_path, images, monkeypatch):
    folder, arrays = images
    out = tmp_path / "out"
    cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.ENABLED", "True",
               "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SHARES", "[0.2, 0.2, 0.6]", "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_PIXELS", "60")
    plain = _label_shares_of(arrays, np.zeros(3))
    assert plain[2] < 0.5
    report = generate_pseudo_labels(cfg, str(folder), out, model=ColourTeacher())
    assert report["written"] == 5
    balance = json.loads((out / "meta.json").read_text())["class_balance"]
    offsets = np.asarray(balance["offsets"])
    # every pixel of the 5 readable images was sampled, so the labels hold exactly the fitted shares
    assert balance["sampled_pixels"] == 5 * 60
    np.testing.assert_allclose(balance["teacher_shares"], plain, atol=1e-12)
    np.testing.assert_allclose(_label_shares(out, arrays), balance["balanced_shares"], atol=1e-12)
    np.testing.assert_allclose(balance["balanced_shares"], [0.2, 0.2, 0.6], rtol=0.1)
    for key, arr in arrays.items():  # the label is the argmax of p * exp(offsets)
        expected = (colour_probs(arr) * np.exp(offsets)[:, None, None]).argmax(0)
        np.testing.assert_array_equal(load_hard_label(out / "labels" / f"{key}.png"), expected)

    # a rerun after deleting labels refits nothing: the offsets come from meta.json
    (out / "labels" / "img1.png").unlink()
    monkeypatch.setattr(class_balance, "fit_class_offsets", lambda *a, **k: pytest.fail("offsets refitted"))
    assert generate_pseudo_labels(cfg, str(folder), out, model=ColourTeacher())["written"] == 1
    np.testing.assert_allclose(_label_shares(out, arrays), balance["balanced_shares"], atol=1e-12)
    # other class-balance settings are another folder
    cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_PIXELS = 30
    with pytest.raises(ValueError, match="settings"):
        generate_pseudo_labels(cfg, str(folder), out, model=ColourTeacher())


def _label_shares_of(arrays, offsets):
    labels = np.concatenate([(colour_probs(a) * np.exp(offsets)[:, None, None]).argmax(0).ravel()
                             for a in arrays.values()])
    return np.bincount(labels, minlength=3) / labels.size


def test_generator_targets_the_teachers_training_labels(tmp_path, images, new_name):
    folder, arrays = images
    labelled = new_name("labelled")
    label = np.array([[0, 1, 2, 2, 255]], np.uint8)  # shares 1/4, 1/4, 1/2
    Image.fromarray(label).save(tmp_path / "l.png")
    DatasetCatalog.register(labelled, lambda: [{"file_name": "x.png", "sem_seg_file_name": str(tmp_path / "l.png")}])
    MetadataCatalog.get(labelled).set(stuff_classes=["r", "g", "b"])
    cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.ENABLED", "True", "DATASETS.TRAIN", f"('{labelled}',)")
    generate_pseudo_labels(cfg, str(folder), tmp_path / "out", model=ColourTeacher())
    balance = json.loads((tmp_path / "out" / "meta.json").read_text())["class_balance"]
    np.testing.assert_allclose(balance["target_shares"], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(balance["balanced_shares"], [0.25, 0.25, 0.5], rtol=0.1)


def test_class_balance_refused_for_instance_teachers(tmp_path, images):
    folder, _ = images
    cfg = pseudo_label_cfg("BoxTeacher", "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.ENABLED", "True")
    with pytest.raises(ValueError, match="CLASS_BALANCE apply to semantic teachers only"):
        generate_pseudo_labels(cfg, str(folder), tmp_path / "out")


def test_two_machines_fit_the_offsets_of_one_process(tmp_path, images):
    """Across ranks every rank predicts part of the sample, the pixels are gathered and each rank fits the same
    offsets: two "machines" on loopback (the command, gloo) write the labels and meta.json one process writes."""
    folder, arrays = images
    opts = ["OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.ENABLED", "True", "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SHARES",
            "[0.2, 0.2, 0.6]", "OFFLINE_PSEUDO_LABELS.CLASS_BALANCE.SAMPLE_PIXELS", "60"]
    generate_pseudo_labels(pseudo_label_cfg("ColourTeacher", *opts), str(folder), tmp_path / "one", model=ColourTeacher())

    weights = tmp_path / "colour.pth"
    torch.save({"model": ColourTeacher().state_dict()}, weights)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    config = tmp_path / "colour.yaml"  # the fake teacher's config (pseudo_label_cfg's settings)
    config.write_text("SELFTRAIN: {IMPORTS: [tests.helpers]}\nMODEL: {META_ARCHITECTURE: ColourTeacher, DEVICE: cpu, "
                      "SEM_SEG_HEAD: {NUM_CLASSES: 3}}\nINPUT: {FORMAT: RGB, MIN_SIZE_TEST: 0}\n")
    command = [sys.executable, "-m", "selftrain_d2.cli.generate_pseudo_labels", "--num-machines", "2",
               "--dist-url", url, "--config-file", str(config), "--input", str(folder), "--output",
               str(tmp_path / "two"), "MODEL.WEIGHTS", str(weights), *opts]
    codes, logs, _ = run_together([command[:3] + ["--machine-rank", str(r)] + command[3:] for r in (0, 1)], 240)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    one, two = (json.loads((tmp_path / d / "meta.json").read_text())["class_balance"] for d in ("one", "two"))
    assert two["sampled_pixels"] == one["sampled_pixels"] == 5 * 60
    np.testing.assert_allclose(two["offsets"], one["offsets"], atol=1e-9)
    for key in arrays:
        np.testing.assert_array_equal(load_hard_label(tmp_path / "two" / "labels" / f"{key}.png"),
                                      load_hard_label(tmp_path / "one" / "labels" / f"{key}.png"))
