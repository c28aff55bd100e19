"""Pseudo labelling at scale (issue 26): top-k on the device equal to the argsort it replaced, hard-label files
byte-identical to the host computation, only uint8 / float16 arrays to the host, batched progress that survives a
kill, background reading and writing, and weights loaded without running code."""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from selftrain_d2.pseudo_labels import generate_pseudo_labels, read_soft_label, storage, write_soft_label
from selftrain_d2.pseudo_labels.generate import instance_predictions
from ..conftest import ROOT
from ..helpers import BoxTeacher, ColourTeacher, colour_probs, pseudo_label_cfg



def _tied_probs(num_classes, height, width, seed):
    """float32 [C, H, W] with many ties: values on a coarse grid, zeros of both signs."""
    rng = np.random.default_rng(seed)
    probs = rng.integers(0, 4, size=(num_classes, height, width)).astype(np.float32) / 4
    probs[rng.random(probs.shape) < 0.2] = -0.0
    return probs


def _argsort_top_k(probs, k):
    order = np.argsort(-probs, axis=0, kind="stable")[:k]
    return order, np.take_along_axis(probs, order, axis=0)


@pytest.mark.parametrize("num_classes,k", [(3, 1), (3, 3), (19, 1), (19, 3), (300, 4)])
def test_top_classes_equal_stable_argsort_with_ties(num_classes, k, monkeypatch):
    # Small blocks, so that several blocks and a short last one run.
    monkeypatch.setitem(storage._BLOCK_ELEMENTS, "cpu", num_classes * 7)
    probs = _tied_probs(num_classes, 5, 9, seed=num_classes + k)
    values, indices = storage.top_classes(torch.from_numpy(probs), k)
    order, expected = _argsort_top_k(probs, k)
    assert indices.dtype == (torch.uint8 if num_classes <= 256 else torch.int32)
    np.testing.assert_array_equal(indices.numpy(), order)
    np.testing.assert_array_equal(values.numpy(), expected)
    # The public numpy helpers agree, and so do the other input dtypes.
    idx, val = storage.top_k_probabilities(probs, k)
    np.testing.assert_array_equal(idx, order)
    for dtype in (torch.float64, torch.float16):
        np.testing.assert_array_equal(storage.top_classes(torch.from_numpy(probs).to(dtype), k)[1].numpy(), order)


def test_soft_label_files_hold_the_argsort_top_k(tmp_path):
    probs = _tied_probs(19, 6, 10, seed=3)
    write_soft_label(tmp_path / "s.npz", probs, top_k=3)
    soft = read_soft_label(tmp_path / "s.npz")
    order, expected = _argsort_top_k(probs, 3)
    np.testing.assert_array_equal(soft["indices"], order)
    np.testing.assert_array_equal(soft["probs"], expected.astype(np.float16).astype(np.float32))
    assert soft["num_classes"] == 19


def test_top_classes_refuses_nan():
    probs = torch.rand(4, 3, 3)
    probs[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        storage.top_classes(probs, 1)
    with pytest.raises(ValueError, match="NaN"):
        storage.top_classes(probs, 2)


def _png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hard_label_files_are_byte_identical_to_the_host_computation(tmp_path):
    # What the files held before issue 26: numpy argmax / max on the host, threshold, round(p * 255), PIL PNG.
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        image = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
        image[:4, :4] = (200, 200, 7)  # classes 0 and 1 tie at the top
        Image.fromarray(image).save(folder / f"im{i}.png")
    cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.THRESHOLD", "0.4", "OFFLINE_PSEUDO_LABELS.SAVE_CONFIDENCE", "True")
    out = tmp_path / "out"
    generate_pseudo_labels(cfg, str(folder), out, model=ColourTeacher())
    for i in range(3):
        # The teacher's float32 probabilities, as the generator computes them.
        image = torch.as_tensor(np.asarray(Image.open(folder / f"im{i}.png")).transpose(2, 0, 1).copy())
        scores = (image.float() + 1).clamp(min=0)
        probs = (scores / scores.sum(0, keepdim=True).clamp(min=1e-12)).numpy()
        label = probs.argmax(0).astype(np.uint8)
        confidence = probs.max(0).astype(np.float32)
        label[confidence < 0.4] = 255
        assert (label == 255).any() and (label[:4, :4] == 0).all()
        assert (out / "labels" / f"im{i}.png").read_bytes() == _png_bytes(label)
        quantized = np.rint(np.clip(confidence, 0.0, 1.0) * 255).astype(np.uint8)
        assert (out / "confidence" / f"im{i}.png").read_bytes() == _png_bytes(quantized)


class _HostReads:
    """Records the dtype and shape of every tensor copied to the CPU by .cpu() or .to()."""

    def __init__(self, monkeypatch):
        self.moved = []
        real_cpu, real_to = torch.Tensor.cpu, torch.Tensor.to

        def cpu(t, *args, **kwargs):
            self.moved.append((t.dtype, tuple(t.shape)))
            return real_cpu(t, *args, **kwargs)

        def to(t, *args, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                self.moved.append((t.dtype, tuple(t.shape)))
            return real_to(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(torch.Tensor, "to", to)

    def large(self):
        """Moved tensors of more than 2 dimensions (per-pixel maps) that are not uint8 / float16."""
        return [(d, s) for d, s in self.moved if len(s) >= 2 and d not in (torch.uint8, torch.float16)]


def test_only_uint8_and_float16_maps_reach_the_host(tmp_path, monkeypatch):
    probs = torch.rand(5, 8, 16).softmax(0)
    reads = _HostReads(monkeypatch)
    arrays = storage.semantic_label_arrays(probs, 0.3, 255, confidence=True, top_k=2)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.uint8), np.dtype(np.float16)}
    assert reads.moved and not reads.large(), reads.moved

    # Instances: masks thresholded (uint8) before they move; before issue 26 the float masks went to the host.
    reads.moved.clear()
    cfg = pseudo_label_cfg("BoxTeacher")
    prediction = instance_predictions(BoxTeacher(cfg), torch.zeros(3, 6, 10, dtype=torch.uint8), 6, 10, 0.5)
    assert prediction["masks"].dtype == np.uint8 and prediction["masks"].shape == (1, 6, 10)
    assert not reads.large(), reads.moved


def test_reader_and_writer_threads_give_the_same_files(tmp_path, images):
    folder, _ = images
    outputs = {}
    for workers in ("0", "3"):
        cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.FORMAT", "soft", "OFFLINE_PSEUDO_LABELS.SAVE_CONFIDENCE", "True",
                   "DATALOADER.NUM_WORKERS", workers)
        out = tmp_path / f"out{workers}"
        report = generate_pseudo_labels(cfg, str(folder), out, model=ColourTeacher())
        assert report["written"] == 5 and len(report["skipped"]) == 1
        outputs[workers] = out
    for sub in ("labels", "confidence"):
        for name in sorted(os.listdir(outputs["0"] / sub)):
            path = os.path.join(sub, name)
            if os.path.isfile(outputs["0"] / path):
                assert (outputs["0"] / path).read_bytes() == (outputs["3"] / path).read_bytes(), path
    for key in ("img0", "sub/img4"):
        a, b = (read_soft_label(outputs[w] / "soft" / f"{key}.npz") for w in ("0", "3"))
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_array_equal(a["probs"], b["probs"])
    datasets = [json.loads((outputs[w] / "dataset.json").read_text()) for w in ("0", "3")]
    assert [d["image_id"] for d in datasets[0]] == [d["image_id"] for d in datasets[1]]


# ------------------------------------------------------------------------------------------- kills

_KILLED_RUN = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from selftrain_d2.pseudo_labels import generate, generate_pseudo_labels, storage
    from tests.helpers import ColourTeacher, pseudo_label_cfg

    generate.PROGRESS_BATCH = 3
    mode, when = sys.argv[1], int(sys.argv[2])
    calls = []

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "write":  # killed while writing an image's files
        real = storage.write_hard_label

        def write_hard_label(path, label, **kwargs):
            calls.append(path)
            if len(calls) == when:
                kill()
            real(path, label, **kwargs)

        storage.write_hard_label = write_hard_label
    else:  # killed while appending a batch's progress lines: one line and half of the next reach the file
        real = generate._ProgressLog.add

        def add(self, entries):
            calls.append(entries)
            if len(calls) == when:
                lines = generate.json.dumps({{"key": entries[0][0], "height": 1, "width": 1}}) + "\\n"
                self._f.write(lines + lines[:9])
                self._f.flush()
                kill()
            real(self, entries)

        generate._ProgressLog.add = add
    cfg = pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.FORMAT", "soft", "DATALOADER.NUM_WORKERS", "0")
    generate_pseudo_labels(cfg, sys.argv[3], sys.argv[4], model=ColourTeacher())
''')


def _progress_keys(out):
    keys = []
    for line in (out / "progress" / "rank0.jsonl").read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                keys.append(json.loads(line)["key"])
            except ValueError:
                pass
    return keys


@pytest.mark.parametrize("mode,when,recorded", [("write", 8, 6), ("progress", 2, 4)])
def test_kill_during_batched_progress_resumes_with_every_file_intact(tmp_path, mode, when, recorded):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    arrays = {}
    for i in range(10):
        arrays[f"im{i}"] = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
        Image.fromarray(arrays[f"im{i}"]).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN.format(root=ROOT))
    proc = subprocess.run([sys.executable, str(script), mode, str(when), str(folder), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Batches of 3: "write" dies writing image 8, after two committed batches; "progress" dies appending the
    # second batch, of which one line is complete (the half line after it does not count).
    first = _progress_keys(out)
    assert len(first) == len(set(first)) == recorded

    teacher = ColourTeacher()
    report = generate_pseudo_labels(pseudo_label_cfg("ColourTeacher", "OFFLINE_PSEUDO_LABELS.FORMAT", "soft"), str(folder), out,
                                    model=teacher)
    # Nothing recorded is labelled again, nothing unrecorded is lost.
    assert report["already_done"] == recorded and report["written"] == 10 - recorded == teacher.calls
    keys = _progress_keys(out)
    assert sorted(keys) == sorted(arrays) and len(keys) == len(set(keys))
    assert sorted(d["image_id"] for d in json.loads((out / "dataset.json").read_text())) == sorted(arrays)
    for key, image in arrays.items():
        probs = colour_probs(image)
        np.testing.assert_array_equal(storage.load_hard_label(out / "labels" / f"{key}.png"), probs.argmax(0))
        soft = read_soft_label(out / "soft" / f"{key}.npz")
        np.testing.assert_allclose(storage.soft_label_to_dense(soft), probs, rtol=2e-3)
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- safe loading

class _CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs what the file says."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_teacher_weights_load_without_running_code(tmp_path, images, monkeypatch, suffix):
    from selftrain_d2.utils.safe_load import UnsafeWeightsError

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # as with an older torch
    folder, _ = images
    marker = tmp_path / "marker"
    weights = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        weights.write_bytes(pickle.dumps({"model": {"scale": np.ones((), np.float32)}, "__author__": "x",
                                          "payload": _CreatesFile(str(marker))}, protocol=2))
    else:
        torch.save({"model": {"scale": torch.ones(())}, "payload": _CreatesFile(str(marker))}, weights)
    cfg = pseudo_label_cfg("ColourTeacher", "MODEL.WEIGHTS", str(weights))
    with pytest.raises(UnsafeWeightsError, match="evil"):
        generate_pseudo_labels(cfg, str(folder), tmp_path / "out")  # the teacher is built from cfg
    assert not marker.exists()
