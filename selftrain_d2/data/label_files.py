"""The pseudo-label file formats, read by the data layer (the mappers read soft labels) and written by
:mod:`selftrain_d2.pseudo_labels`: hard labels (train ids) and confidence maps as single-channel PNGs, soft
labels as the top-k class probabilities in an ``.npz``. Every writer goes through
:func:`selftrain_d2.utils.io.atomic_write`, so a killed job leaves either a complete file or none; readers
raise errors that name the file."""
import zipfile

import numpy as np
import torch
from PIL import Image

from ..utils.io import atomic_write

__all__ = [
    "write_hard_label", "load_hard_label", "write_confidence", "load_confidence", "quantize_confidence",
    "write_top_k", "read_soft_label", "soft_label_to_dense",
]

# np.savez_compressed deflated everything at zlib's level 6. Soft labels' class indices are deflated at level 1
# (level 6 took 6x the time to save another 4%); their float16 probabilities are stored as they are: deflate
# saved 18% of them for 330 ms a Cityscapes-size image (benchmarks/pseudo_label_postprocess.py).
_SOFT_COMPRESSLEVEL = 1


def quantize_confidence(confidence):
    """uint8 ``round(clip(confidence, 0, 1) * 255)`` (half to even) of a float tensor, on its device."""
    return torch.clamp(confidence.float(), 0.0, 1.0).mul_(255).round_().to(torch.uint8)


def _write_png(path, array, sync_dir):
    with atomic_write(path, "wb", sync_dir=sync_dir) as f:
        Image.fromarray(array).save(f, format="PNG")


def _read_png(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read pseudo-label file {path}: {type(e).__name__}: {e}") from e


def write_hard_label(path, label, sync_dir=True):
    """Write a ``[H, W]`` map of train ids (uint8, 255 = ignore) as a single-channel PNG. ``sync_dir``: see
    :func:`~selftrain_d2.utils.io.atomic_write` (the generator syncs each folder once per batch instead)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"hard label for {path} must be [H, W], got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"hard label for {path} holds ids outside 0..255")
        label = label.astype(np.uint8)
    _write_png(path, label, sync_dir)


def load_hard_label(path):
    """The uint8 ``[H, W]`` train-id map written by :func:`write_hard_label`."""
    label = _read_png(path)
    if label.ndim != 2:
        raise ValueError(f"pseudo label {path} has shape {label.shape}; expected a single-channel PNG")
    return label


def write_confidence(path, confidence, sync_dir=True):
    """Write a ``[H, W]`` confidence map as a uint8 PNG holding ``round(conf * 255)``: float values in [0, 1]
    are quantized here; uint8 values are taken as already quantized (:func:`quantize_confidence`)."""
    confidence = np.asarray(confidence)
    if confidence.dtype != np.uint8:
        confidence = quantize_confidence(torch.as_tensor(confidence.astype(np.float32, copy=False))).numpy()
    _write_png(path, confidence, sync_dir)


def load_confidence(path):
    """float32 ``[H, W]`` in [0, 1] (quantised to multiples of 1/255)."""
    return _read_png(path).astype(np.float32) / 255.0


def write_top_k(path, indices, probs, num_classes, sync_dir=True):
    """Write top-k soft labels: ``indices`` [k, H, W] (uint8, or uint16 for more than 256 classes) and their
    ``probs`` (stored as float16) as an .npz with keys ``indices`` (deflated), ``probs`` and ``num_classes``."""
    if num_classes > 65536:
        raise ValueError(f"soft label for {path}: {num_classes} classes do not fit uint16 indices")
    index_dtype = np.uint8 if num_classes <= 256 else np.uint16
    entries = [("indices", np.asarray(indices).astype(index_dtype, copy=False), True),
               ("probs", np.asarray(probs).astype(np.float16, copy=False), False),
               ("num_classes", np.int64(num_classes), False)]
    with atomic_write(path, "wb", sync_dir=sync_dir) as f:
        # np.savez's layout (one .npy per key); an entry opened by ZipInfo is stored, by name deflated.
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_SOFT_COMPRESSLEVEL) as zf:
            for name, array, deflate in entries:
                entry = name + ".npy" if deflate else zipfile.ZipInfo(name + ".npy")
                with zf.open(entry, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def read_soft_label(path):
    """``{"indices": [k, H, W], "probs": float32 [k, H, W], "num_classes": int}`` from :func:`write_soft_label`."""
    try:
        with np.load(path) as data:
            return {
                "indices": data["indices"],
                "probs": data["probs"].astype(np.float32),
                "num_classes": int(data["num_classes"]),
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise OSError(f"cannot read soft pseudo label {path}: {type(e).__name__}: {e}") from e


def soft_label_to_dense(soft):
    """float32 ``[C, H, W]``: the stored top-k probabilities in place, every other class 0."""
    k, h, w = soft["indices"].shape
    dense = np.zeros((soft["num_classes"], h, w), dtype=np.float32)
    np.put_along_axis(dense, soft["indices"].astype(np.int64), soft["probs"], axis=0)
    return dense
