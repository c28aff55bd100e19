"""Pseudo-label arrays from class probabilities: hard labels, confidence and the top-k soft labels, made on
the device that holds the probabilities (:func:`semantic_label_arrays`); only uint8 / float16 results go to
the host. The file formats they are written in live in :mod:`selftrain_d2.data.label_files` (re-exported here).
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.label_files import (  # noqa: F401 (the formats, re-exported)
    load_confidence, load_hard_label, quantize_confidence, read_soft_label, soft_label_to_dense, write_confidence,
    write_hard_label, write_top_k,
)
from ..teacher.probabilities import ignore_unconfident

__all__ = [
    "write_hard_label", "load_hard_label", "write_confidence", "load_confidence", "quantize_confidence",
    "write_soft_label", "write_top_k", "read_soft_label", "soft_label_to_dense", "top_classes",
    "top_k_probabilities", "hard_label_from_probs", "semantic_label_arrays",
]

# Elements (classes x pixels) per block of the top-k loop: on the CPU a block stays in the L2 cache; elsewhere
# it only bounds the temporary memory.
_BLOCK_ELEMENTS = {"cpu": 1 << 18}
_BLOCK_ELEMENTS_DEFAULT = 1 << 24


def top_classes(probs, k=1):
    """``(values [k, H, W], indices [k, H, W])``: the ``k`` largest of ``probs`` ``[C, H, W]`` per pixel and
    their class ids, best first, computed on ``probs``' device.

    The order is that of a stable sort of ``-probs`` (``np.argsort(-probs, 0, kind="stable")``): equal values
    (``-0.0`` and ``0.0`` too) go to the lower class id first. Values are float32 (float64 for float64 input);
    indices uint8 for up to 256 classes, else int32. NaN and -inf values are refused (``ValueError``).
    """
    probs = torch.as_tensor(probs)
    if probs.ndim != 3:
        raise ValueError(f"class probabilities must be [C, H, W], got shape {tuple(probs.shape)}")
    num_classes = probs.shape[0]
    k = min(int(k), num_classes)
    if k < 1:
        raise ValueError(f"top_classes needs k >= 1, got {k}")
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    flat = probs.reshape(num_classes, -1).contiguous()
    if k == 1:
        values, indices = _max_over_classes(flat)
        values, indices = values[None], indices[None]
    else:
        values, indices = _top_k_by_blocks(flat, k)
    values = values.view(k, *probs.shape[1:])
    indices = indices.to(torch.uint8 if num_classes <= 256 else torch.int32).view(values.shape)
    # Reductions and one read back: NaN (or inf) poisons the sum; a -inf would tie with the classes taken out.
    checks = [values[0].sum()] + ([values[-1].amin()] if k > 1 else [])
    if not all(math.isfinite(v) for v in torch.stack(checks).tolist()):
        raise ValueError("class probabilities hold NaN or infinite values")
    return values, indices


def _max_over_classes(flat):
    """``(values [N], indices int64 [N])`` of a contiguous ``[C, N]``: the first maximum over C."""
    # Pixels as the channels of a 1-D max pooling over the classes: [C, N] seen as a channels-last [1, N, C],
    # which pooling runs vectorised over pixels (torch.max / torch.topk over dim 0 take 5-25x longer on the
    # CPU). Pooling keeps the first of equal maxima, as a stable sort does.
    top, index = F.adaptive_max_pool1d(flat.view(1, flat.shape[0], -1).transpose(1, 2), 1, return_indices=True)
    return top.view(-1), index.view(-1)


def _top_k_by_blocks(flat, k):
    """Top ``k`` of a ``[C, N]`` block of pixels at a time: the first maximum, which is then set to -inf in a
    copy of the block, k times."""
    num_classes, n = flat.shape
    values = torch.empty(k, n, dtype=flat.dtype, device=flat.device)
    indices = torch.empty(k, n, dtype=torch.int64, device=flat.device)
    block = max(1, min(n, _BLOCK_ELEMENTS.get(flat.device.type, _BLOCK_ELEMENTS_DEFAULT) // num_classes))
    buffer = torch.empty(num_classes * block, dtype=flat.dtype, device=flat.device)
    with _one_cpu_thread(flat.device):
        for start in range(0, n, block):
            end = min(n, start + block)
            work = buffer[: num_classes * (end - start)].view(num_classes, end - start)
            work.copy_(flat[:, start:end])
            for r in range(k):
                top, index = _max_over_classes(work)
                values[r, start:end], indices[r, start:end] = top, index
                if r + 1 < k:
                    work.scatter_(0, index.unsqueeze(0), float("-inf"))
    return values, indices


@contextlib.contextmanager
def _one_cpu_thread(device):
    # The ops are memory-bound and many are small: splitting them over threads costs more than it gains, far
    # more when other processes keep the cores busy (top-3 of 19 x 1024 x 2048 on 2 loaded cores: 90 ms CPU
    # with 1 thread, over 1 s with 2). torch's thread count is global: set for the call, then restored.
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_k_probabilities(probs, k):
    """``(indices int64 [k, H, W], values float32 [k, H, W])`` (numpy) of the ``k`` most probable classes per
    pixel, best first, ties to the lower class id (see :func:`top_classes`); ``probs`` as float32."""
    values, indices = top_classes(torch.as_tensor(np.asarray(probs, dtype=np.float32)), k)
    return indices.long().numpy(), values.numpy()


def _check_label_range(num_classes, ignore_label):
    if num_classes > ignore_label or ignore_label > 255:
        raise ValueError(
            f"{num_classes} classes and ignore label {ignore_label} do not fit a uint8 PNG of train ids "
            "(class ids must stay below the ignore label, which must be at most 255)"
        )


def semantic_label_arrays(probs, threshold=0.0, ignore_label=255, confidence=False, top_k=0):
    """The pseudo-label arrays of class probabilities ``probs`` ``[C, H, W]`` (a tensor on any device), computed
    there; only these uint8 / float16 results are copied to the host (numpy):

    - ``label`` uint8 [H, W]: the most probable class, ``ignore_label`` where its probability is under
      ``threshold``;
    - ``confidence`` uint8 [H, W] (with ``confidence``): that probability as ``round(p * 255)``;
    - ``soft_indices`` uint8 [k, H, W] and ``soft_probs`` float16 (with ``top_k`` ``k`` > 0): the ``k`` most
      probable classes, as :func:`top_classes` orders them.
    """
    _check_label_range(probs.shape[0], ignore_label)
    with _one_cpu_thread(probs.device):
        values, indices = top_classes(probs, max(1, int(top_k)))
        label = ignore_unconfident(indices[0], values[0], threshold, ignore_label)
        out = {"label": label}
        if confidence:
            out["confidence"] = quantize_confidence(values[0])
        if top_k > 0:
            out["soft_indices"], out["soft_probs"] = indices, values.to(torch.float16)
        return {name: array.cpu().numpy() for name, array in out.items()}


def hard_label_from_probs(probs, threshold=0.0, ignore_label=255):
    """``(label uint8 [H, W], confidence float32 [H, W])`` (numpy) from class probabilities ``[C, H, W]``.

    label = argmax over classes (ties to the lower id); pixels whose top probability is under ``threshold``
    get ``ignore_label``.
    """
    probs = torch.as_tensor(np.asarray(probs)) if not isinstance(probs, torch.Tensor) else probs
    if probs.ndim != 3:
        raise ValueError(f"class probabilities must be [C, H, W], got shape {tuple(probs.shape)}")
    _check_label_range(probs.shape[0], ignore_label)
    values, indices = top_classes(probs, 1)
    label = ignore_unconfident(indices[0].to(torch.uint8), values[0], threshold, ignore_label)
    return label.cpu().numpy(), values[0].float().cpu().numpy()


def write_soft_label(path, probs, top_k, sync_dir=True):
    """Store the top-k class probabilities of ``probs`` ``[C, H, W]`` (array or tensor) as a compressed .npz
    (:func:`write_top_k`; read with :func:`read_soft_label`)."""
    probs = torch.as_tensor(np.asarray(probs)) if not isinstance(probs, torch.Tensor) else probs
    if probs.ndim != 3:
        raise ValueError(f"soft label for {path} must be [C, H, W] probabilities, got shape {tuple(probs.shape)}")
    num_classes = probs.shape[0]
    if num_classes > 65536:
        raise ValueError(f"soft label for {path}: {num_classes} classes do not fit uint16 indices")
    values, indices = top_classes(probs.float(), top_k)
    write_top_k(path, indices.cpu().numpy(), values.to(torch.float16).cpu().numpy(), num_classes, sync_dir)


