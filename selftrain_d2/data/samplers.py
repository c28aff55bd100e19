"""Training sample plans: which dataset entries (and crop centres) make up each epoch.

A plan is a pure function of ``(seed, epoch)``, so the training stream built on it
(``selftrain_d2.data.build.SeededTrainStream``) stays a pure function of ``(seed, position)``.

- ``PermutationPlan``: every image once per epoch, in a seeded order (plain supervised training).
- ``MixedPlan``: real samples plus ``pseudo_ratio`` pseudo samples per real sample, shuffled together; either
  group can be drawn by class-uniform centroid sampling instead (a class uniformly, then one of its region
  centroids). An epoch holds ``real_repeat x round(real_fraction x num_real)`` real samples: the self-training
  paper's epoch draws half the real images (``real_fraction`` 0.5) plus ratio x that many pseudo samples, so at
  1:1 it is as long as the teacher's epoch; its duplicate-real baseline at ratio x replaces the pseudo samples by
  real ones (``real_repeat`` 1 + x, no pseudo samples: the same epoch length, Table 2b).
"""
from typing import NamedTuple, Optional, Tuple

import numpy as np

__all__ = [
    "mix_seed",
    "PlanEntry",
    "EpochPlan",
    "PermutationPlan",
    "ClassUniformCentroids",
    "class_uniform_centroid_draws",
    "mixed_epoch_plan",
    "real_per_epoch",
    "MixedPlan",
    "plan_stream",
]


def mix_seed(*values):
    """A 32-bit seed derived from integers (stable across processes, unlike ``hash``)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


class PlanEntry(NamedTuple):
    index: int  # position in the training dataset (list of dicts)
    center: Optional[Tuple[int, int]]  # crop centre (y, x) in the original image's pixels, or None
    cls: Optional[int]  # the class whose centroid was drawn, or None


class EpochPlan(NamedTuple):
    """One epoch's samples as arrays; ``center`` is (N, 2) with -1 and ``cls`` -1 where there is none."""

    index: np.ndarray
    center: np.ndarray
    cls: np.ndarray

    def __len__(self):
        return len(self.index)

    def entry(self, i):
        y, x = (int(v) for v in self.center[i])
        c = int(self.cls[i])
        return PlanEntry(int(self.index[i]), (y, x) if y >= 0 else None, c if c >= 0 else None)


def _plain(index):
    index = np.asarray(index, np.int64)
    return EpochPlan(index, np.full((len(index), 2), -1, np.int64), np.full(len(index), -1, np.int64))


def _concat(plans):
    return EpochPlan(*(np.concatenate([getattr(p, f) for p in plans]) for f in EpochPlan._fields))


class PermutationPlan:
    """Epoch ``e`` is a permutation of ``range(size)`` seeded by (seed, e), or the identity."""

    def __init__(self, size, shuffle=True):
        self.epoch_size = int(size)
        self.shuffle = shuffle

    def epoch(self, seed, epoch):
        if not self.shuffle:
            return _plain(np.arange(self.epoch_size))
        return _plain(np.random.default_rng(mix_seed(seed, epoch)).permutation(self.epoch_size))


class ClassUniformCentroids:
    """Draws from a ``CentroidIndex``: a class uniformly among those with centroids, then one of its
    centroids uniformly. The grouping by class is computed once here."""

    def __init__(self, index):
        self.index = index
        cls = index.cls.astype(np.int64)
        self.order = np.argsort(cls, kind="stable")
        self.counts = np.bincount(cls, minlength=index.num_classes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.classes = np.flatnonzero(self.counts)

    def draw(self, n, rng):
        """``n`` row numbers of the index."""
        if len(self.classes) == 0:
            raise ValueError("the centroid index has no centroids to draw from")
        c = self.classes[rng.integers(len(self.classes), size=n)]
        return self.order[self.starts[c] + rng.integers(0, self.counts[c])]

    def plan(self, n, rng, offset=0):
        rows = self.draw(n, rng)
        ix = self.index
        center = np.stack([ix.y[rows].astype(np.int64), ix.x[rows].astype(np.int64)], axis=1).reshape(-1, 2)
        return EpochPlan(ix.image[rows].astype(np.int64) + offset, center, ix.cls[rows].astype(np.int64))


def class_uniform_centroid_draws(index, n, rng):
    """``n`` rows of ``index`` (a CentroidIndex or ClassUniformCentroids) drawn class-uniformly."""
    sampler = index if isinstance(index, ClassUniformCentroids) else ClassUniformCentroids(index)
    return sampler.draw(n, rng)


_PSEUDO_STREAM, _REAL_STREAM = 1, 2  # seeds of the two cycling sequences differ


def _cycling_draws(num, count, seed, epoch, stream=_PSEUDO_STREAM):
    """Samples ``[epoch * count, (epoch + 1) * count)`` of an endless sequence of seeded permutations of
    ``range(num)``: every image is used once before any is used again, across epochs."""
    if count == 0:
        return np.zeros(0, np.int64)
    first, last = epoch * count, (epoch + 1) * count
    cycles = range(first // num, (last - 1) // num + 1)
    seq = np.concatenate([np.random.default_rng(mix_seed(seed, c, stream)).permutation(num) for c in cycles])
    start = first - cycles[0] * num
    return seq[start:start + count]


def real_per_epoch(num_real, real_fraction=1.0, real_repeat=1):
    """Real samples per epoch: ``real_repeat x round(real_fraction x num_real)``, at least one per repeat."""
    return real_repeat * max(1, int(round(real_fraction * num_real))) if num_real else 0


def _epoch_counts(num_real, pseudo_ratio, real_repeat, real_fraction=1.0):
    real = real_per_epoch(num_real, real_fraction, real_repeat)
    return real, int(round(pseudo_ratio * real))


def mixed_epoch_plan(seed, epoch, *, num_real, num_pseudo, pseudo_ratio=1.0, real_repeat=1, real_fraction=1.0,
                     real_centroids=None, pseudo_centroids=None):
    """One epoch of real and pseudo samples, shuffled together.

    Dataset positions ``[0, num_real)`` are the real images and ``[num_real, num_real + num_pseudo)`` the
    pseudo-labelled ones. The epoch holds ``n = real_per_epoch(num_real, real_fraction, real_repeat)`` real
    samples and ``round(pseudo_ratio * n)`` pseudo samples. Real samples are centroid draws when
    ``real_centroids`` is given, else ``real_repeat`` permutations of the real images (``real_fraction`` 1) or
    images without replacement cycling through the real set across epochs (``real_fraction`` < 1: at 0.5,
    every real image once in two epochs). Pseudo samples are centroid draws from ``pseudo_centroids``, or
    images cycling through the pseudo set likewise. Centroid indexes must be aligned to their group's dataset
    positions (``CentroidIndex.aligned_to``).
    """
    n_real, n_pseudo = _epoch_counts(num_real, pseudo_ratio, real_repeat, real_fraction)
    if n_pseudo and not num_pseudo:
        raise ValueError(
            f"pseudo_ratio={pseudo_ratio} asks for {n_pseudo} pseudo samples but there are no pseudo labels"
        )
    rng = np.random.default_rng(mix_seed(seed, epoch))
    if real_centroids is not None:
        real = _sampler(real_centroids).plan(n_real, rng)
    elif real_fraction < 1:
        real = _plain(_cycling_draws(num_real, n_real, seed, epoch, stream=_REAL_STREAM))
    else:
        real = _plain(np.concatenate([rng.permutation(num_real) for _ in range(real_repeat)] or [[]]))
    if pseudo_centroids is not None:
        pseudo = _sampler(pseudo_centroids).plan(n_pseudo, rng, offset=num_real)
    else:
        pseudo = _plain(_cycling_draws(num_pseudo, n_pseudo, seed, epoch) + num_real)
    both = _concat([real, pseudo])
    order = rng.permutation(len(both))
    return EpochPlan(*(a[order] for a in both))


def _sampler(index):
    return index if isinstance(index, ClassUniformCentroids) else ClassUniformCentroids(index)


class MixedPlan:
    """``mixed_epoch_plan`` with fixed sizes and settings (centroid grouping computed once)."""

    def __init__(self, num_real, num_pseudo, *, pseudo_ratio=1.0, real_repeat=1, real_fraction=1.0,
                 real_centroids=None, pseudo_centroids=None):
        if real_repeat < 1 or int(real_repeat) != real_repeat:
            raise ValueError(f"real_repeat must be a positive integer, got {real_repeat}")
        if pseudo_ratio < 0:
            raise ValueError(f"pseudo_ratio must be >= 0, got {pseudo_ratio}")
        if not 0 < real_fraction <= 1:
            raise ValueError(f"real_fraction must be in (0, 1], got {real_fraction}")
        self.kwargs = dict(
            num_real=int(num_real), num_pseudo=int(num_pseudo), pseudo_ratio=float(pseudo_ratio),
            real_repeat=int(real_repeat), real_fraction=float(real_fraction),
            real_centroids=None if real_centroids is None else _sampler(real_centroids),
            pseudo_centroids=None if pseudo_centroids is None else _sampler(pseudo_centroids),
        )
        self.num_real_samples, self.num_pseudo_samples = _epoch_counts(num_real, pseudo_ratio, real_repeat,
                                                                       real_fraction)
        if self.num_pseudo_samples and not num_pseudo:
            raise ValueError(f"pseudo_ratio={pseudo_ratio} asks for pseudo samples but there are no pseudo labels")
        self.epoch_size = self.num_real_samples + self.num_pseudo_samples

    def epoch(self, seed, epoch):
        return mixed_epoch_plan(seed, epoch, **self.kwargs)


def plan_stream(plan, seed, start=0):
    """Infinite ``(position, PlanEntry)`` pairs: epoch ``e`` is ``plan.epoch(seed, e)``; starts at ``start``."""
    size = plan.epoch_size
    if size <= 0:
        raise ValueError("the training plan has no samples (empty training datasets?)")
    epoch, offset = divmod(start, size)
    position = start
    while True:
        current = plan.epoch(seed, epoch)
        for i in range(offset, size):
            yield position, current.entry(i)
            position += 1
        epoch, offset = epoch + 1, 0
