"""Pseudo-label files: hard labels and confidence maps as PNG, soft labels as compressed top-k .npz.

Every writer goes through :func:`selftrain_d2.utils.io.atomic_write`, so a killed job leaves either a complete
file or none. Readers raise errors that name the file.
"""
import numpy as np
from PIL import Image

from ..utils.io import atomic_write

__all__ = [
    "write_hard_label", "load_hard_label", "write_confidence", "load_confidence",
    "write_soft_label", "read_soft_label", "soft_label_to_dense", "top_k_probabilities", "hard_label_from_probs",
]


def hard_label_from_probs(probs, threshold=0.0, ignore_label=255):
    """``(label uint8 [H, W], confidence float32 [H, W])`` from class probabilities ``[C, H, W]``.

    label = argmax over classes; pixels whose top probability is under ``threshold`` get ``ignore_label``.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"class probabilities must be [C, H, W], got shape {probs.shape}")
    if probs.shape[0] > ignore_label or ignore_label > 255:
        raise ValueError(
            f"{probs.shape[0]} classes and ignore label {ignore_label} do not fit a uint8 PNG of train ids "
            "(class ids must stay below the ignore label, which must be at most 255)"
        )
    label = probs.argmax(0).astype(np.uint8)
    confidence = probs.max(0).astype(np.float32)
    if threshold > 0:
        label[confidence < threshold] = ignore_label
    return label, confidence


def _write_png(path, array):
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def _read_png(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read pseudo-label file {path}: {type(e).__name__}: {e}") from e


def write_hard_label(path, label):
    """Write a ``[H, W]`` map of train ids (uint8, 255 = ignore) as a single-channel PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"hard label for {path} must be [H, W], got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"hard label for {path} holds ids outside 0..255")
        label = label.astype(np.uint8)
    _write_png(path, label)


def load_hard_label(path):
    """The uint8 ``[H, W]`` train-id map written by :func:`write_hard_label`."""
    label = _read_png(path)
    if label.ndim != 2:
        raise ValueError(f"pseudo label {path} has shape {label.shape}; expected a single-channel PNG")
    return label


def write_confidence(path, confidence):
    """Write a ``[H, W]`` confidence map in [0, 1] as a uint8 PNG holding ``round(conf * 255)``."""
    confidence = np.asarray(confidence, dtype=np.float32)
    _write_png(path, np.rint(np.clip(confidence, 0.0, 1.0) * 255).astype(np.uint8))


def load_confidence(path):
    """float32 ``[H, W]`` in [0, 1] (quantised to multiples of 1/255)."""
    return _read_png(path).astype(np.float32) / 255.0


def top_k_probabilities(probs, k):
    """``(indices [k, H, W], values [k, H, W])`` of the ``k`` most probable classes per pixel, best first."""
    probs = np.asarray(probs, dtype=np.float32)
    num_classes = probs.shape[0]
    k = min(int(k), num_classes)
    if k < 1:
        raise ValueError(f"soft labels need top-k >= 1, got {k}")
    order = np.argsort(-probs, axis=0, kind="stable")[:k]
    return order, np.take_along_axis(probs, order, axis=0)


def write_soft_label(path, probs, top_k):
    """Store the top-k class probabilities of ``probs`` ``[C, H, W]`` as a compressed .npz.

    Keys: ``indices`` (uint8, or uint16 for more than 256 classes), ``probs`` (float16), ``num_classes``.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"soft label for {path} must be [C, H, W] probabilities, got shape {probs.shape}")
    num_classes = probs.shape[0]
    if num_classes > 65536:
        raise ValueError(f"soft label for {path}: {num_classes} classes do not fit uint16 indices")
    indices, values = top_k_probabilities(probs, top_k)
    index_dtype = np.uint8 if num_classes <= 256 else np.uint16
    with atomic_write(path, "wb") as f:
        np.savez_compressed(
            f, indices=indices.astype(index_dtype), probs=values.astype(np.float16),
            num_classes=np.int64(num_classes),
        )


def read_soft_label(path):
    """``{"indices": [k, H, W], "probs": float32 [k, H, W], "num_classes": int}`` from :func:`write_soft_label`."""
    try:
        with np.load(path) as data:
            return {
                "indices": data["indices"],
                "probs": data["probs"].astype(np.float32),
                "num_classes": int(data["num_classes"]),
            }
    except (OSError, ValueError, KeyError) as e:
        raise OSError(f"cannot read soft pseudo label {path}: {type(e).__name__}: {e}") from e


def soft_label_to_dense(soft):
    """float32 ``[C, H, W]``: the stored top-k probabilities in place, every other class 0."""
    k, h, w = soft["indices"].shape
    dense = np.zeros((soft["num_classes"], h, w), dtype=np.float32)
    np.put_along_axis(dense, soft["indices"].astype(np.int64), soft["probs"], axis=0)
    return dense
