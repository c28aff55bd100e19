"""Crop-size schedules (self-training paper, section 3.3): which crop each epoch trains at, the batch size
that keeps pixels per batch about constant, and the learning-rate factor that follows the batch size.

Everything here is a pure function of the epoch; ``EpochTable`` turns a schedule into the per-epoch
(crop, batch, iterations) table that the training stream, the learning-rate schedule and the checkpoint
share, so a resumed run continues at the same crop, batch and learning rate.

Crops are given as scales of ``INPUT.CROP.SIZE`` (the largest crop), e.g. 0.5 ... 1.0 in steps of 0.1 for
the paper's 400 ... 800 in steps of 80 at an 800 crop; ``scaled_crop`` rounds the sides to the models'
padding multiple.
"""
import math
from dataclasses import dataclass

from ..utils.registry import NamedRegistry

__all__ = ["CROP_SCHEDULE_REGISTRY", "scale_index", "scaled_crop", "batch_for_crop", "lr_factor", "EpochTable",
           "EpochEntry"]

CROP_SCHEDULE_REGISTRY = NamedRegistry("CROP_SCHEDULE")
CROP_SCHEDULE_REGISTRY.__doc__ = """Crop schedules by name: f(epoch, num_epochs, num_scales, period) -> index
into the ascending list of crop scales, for epochs after the warm-up."""


@CROP_SCHEDULE_REGISTRY.register("constant")
def _constant(epoch, num_epochs, num_scales, period):
    return num_scales - 1


@CROP_SCHEDULE_REGISTRY.register("coarse2fine")
def _coarse2fine(epoch, num_epochs, num_scales, period):
    """Each crop for ``period`` epochs; with period 0, the epochs are shared evenly (the last crop is
    always reached)."""
    step = epoch // period if period > 0 else epoch * num_scales // num_epochs
    return min(step, num_scales - 1)


@CROP_SCHEDULE_REGISTRY.register("fine2coarse")
def _fine2coarse(epoch, num_epochs, num_scales, period):
    return num_scales - 1 - _coarse2fine(epoch, num_epochs, num_scales, period)


@CROP_SCHEDULE_REGISTRY.register("coarse2fine+")
def _coarse2fine_plus(epoch, num_epochs, num_scales, period):
    return epoch % num_scales


@CROP_SCHEDULE_REGISTRY.register("fine2coarse+")
def _fine2coarse_plus(epoch, num_epochs, num_scales, period):
    return num_scales - 1 - epoch % num_scales


def scale_index(name, epoch, num_epochs, num_scales, period=0, warmup_epochs=0):
    """Index into the ascending crop scales for ``epoch``: the largest during the warm-up, then the
    schedule ``name`` counted from the end of the warm-up."""
    if name not in CROP_SCHEDULE_REGISTRY:
        raise KeyError(f"unknown crop schedule {name!r}; registered: {sorted(n for n, _ in CROP_SCHEDULE_REGISTRY)}")
    if epoch < warmup_epochs or name == "constant":
        return num_scales - 1
    return CROP_SCHEDULE_REGISTRY.get(name)(epoch - warmup_epochs, num_epochs - warmup_epochs, num_scales, period)


def scaled_crop(full_crop, scale, size_divisibility=1):
    """``full_crop`` (h, w) times ``scale``, each side rounded to the nearest multiple of ``size_divisibility``
    (at least one multiple, at most the full side). Models pad their input to that multiple, so a crop off it
    pays for padding pixels that carry no loss: at a 128x256 crop, 77x154 is padded to 96x160 (1.3x the
    pixels). The full crop itself is kept as configured."""
    if scale >= 1.0:
        return tuple(int(v) for v in full_crop)
    d = max(1, int(size_divisibility))
    return tuple(min(int(full), max(d, d * int(round(full * scale / d)))) for full in full_crop)


def batch_for_crop(crop, full_crop, full_batch, max_batch, multiple=1):
    """The batch size that keeps pixels per batch about what ``full_batch`` crops of ``full_crop`` hold,
    capped at ``max_batch`` and rounded down to a multiple of ``multiple`` (the number of processes)."""
    pixels = full_crop[0] * full_crop[1] * full_batch
    batch = min(max_batch, pixels // (crop[0] * crop[1]))
    return max(multiple, batch // multiple * multiple)


def lr_factor(batch, full_batch, rule="linear"):
    """How the learning rate follows the batch size: linear (Goyal et al.), square root, or not at all ("none")."""
    if rule == "linear":
        return batch / full_batch
    if rule == "sqrt":
        return math.sqrt(batch / full_batch)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}: use linear, sqrt or none")


@dataclass(frozen=True)
class EpochEntry:
    epoch: int
    crop: tuple  # (height, width)
    batch: int  # total over all processes
    iterations: int
    first_iter: int  # global iteration at which this epoch starts
    first_sample: int  # global sample position at which this epoch starts
    lr_factor: float


class EpochTable:
    """The whole schedule, epoch by epoch: every epoch processes ``epoch_size`` samples, so the number of
    images seen equals the constant schedule's; epochs at small crops take fewer, larger batches.

    The last batch of an epoch may be short (``epoch_size`` not divisible by the batch), so epoch ``e`` is
    exactly the sample positions ``[e * epoch_size, (e + 1) * epoch_size)`` whatever the schedule. With
    ``multiple`` processes the epoch size is rounded up to a multiple of it, so no process gets an empty batch.
    """

    def __init__(self, *, schedule, scales, full_crop, full_batch, max_batch, epoch_size, num_epochs,
                 period=0, warmup_epochs=0, lr_rule="linear", multiple=1, size_divisibility=1):
        scales = sorted(float(s) for s in scales)
        if not scales or scales[-1] > 1.0 or scales[0] <= 0:
            raise ValueError(f"crop scales must be in (0, 1], got {scales}")
        if epoch_size <= 0 or num_epochs <= 0:
            raise ValueError(f"epoch_size ({epoch_size}) and num_epochs ({num_epochs}) must be positive")
        epoch_size = math.ceil(epoch_size / multiple) * multiple
        self.epoch_size = epoch_size
        self.entries = []
        iteration = sample = 0
        for epoch in range(num_epochs):
            s = scales[scale_index(schedule, epoch, num_epochs, len(scales), period, warmup_epochs)]
            crop = scaled_crop(full_crop, s, size_divisibility)
            batch = batch_for_crop(crop, full_crop, full_batch, max(max_batch, full_batch), multiple)
            iters = math.ceil(epoch_size / batch)
            self.entries.append(EpochEntry(epoch, crop, batch, iters, iteration, sample,
                                           lr_factor(batch, full_batch, lr_rule)))
            iteration += iters
            sample += epoch_size
        self.max_iter = iteration

    def at_iter(self, iteration):
        """The entry of the epoch that global iteration ``iteration`` belongs to (the last one beyond)."""
        lo, hi = 0, len(self.entries) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.entries[mid].first_iter <= iteration:
                lo = mid
            else:
                hi = mid - 1
        return self.entries[lo]

    def batch_span(self, iteration):
        """Global sample positions ``[start, stop)`` of ``iteration``'s batch (all processes together)."""
        if iteration >= self.max_iter:
            # Past the schedule (e.g. a longer MAX_ITER): the last epoch's settings, epoch after epoch.
            last = self.entries[-1]
            extra = iteration - self.max_iter
            epoch, k = divmod(extra, last.iterations)
            start = last.first_sample + (epoch + 1) * self.epoch_size + k * last.batch
            return start, min(start + last.batch, last.first_sample + (epoch + 2) * self.epoch_size)
        e = self.at_iter(iteration)
        start = e.first_sample + (iteration - e.first_iter) * e.batch
        return start, min(start + e.batch, e.first_sample + self.epoch_size)

    def images_seen(self, iteration):
        """Samples processed before ``iteration`` (what the learning-rate schedule's progress counts)."""
        return self.batch_span(iteration)[0]

    def total_images(self):
        return self.epoch_size * len(self.entries)
