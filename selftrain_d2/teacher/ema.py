"""Exponential moving average of a student's weights into a teacher: pure tensor maths, no state."""
import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ema_update_", "copy_weights_"]


def _paired(teacher, student, named):
    t_items, s_items = dict(named(teacher)), dict(named(student))
    if t_items.keys() != s_items.keys():
        missing = sorted(s_items.keys() - t_items.keys())[:5]
        extra = sorted(t_items.keys() - s_items.keys())[:5]
        raise ValueError(
            "teacher and student differ in their tensors (EMA needs the same architecture): "
            f"only in the student {missing}, only in the teacher {extra}"
        )
    pairs = []
    for name, t in t_items.items():
        s = s_items[name]
        if t.shape != s.shape:
            raise ValueError(f"teacher {name} is {tuple(t.shape)} but the student's is {tuple(s.shape)}")
        pairs.append((t, s))
    return pairs


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _named_tensors(module):
    yield from module.named_parameters()
    yield from module.named_buffers()


@torch.no_grad()
def ema_update_(teacher, student, decay):
    """``teacher <- decay * teacher + (1 - decay) * student`` for floating-point parameters and buffers,
    in place; integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied. ``decay`` 0 copies
    the student exactly. Either model may be wrapped in DistributedDataParallel."""
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    teacher, student = _unwrap(teacher), _unwrap(student)
    lerp_t, lerp_s = [], []
    for t, s in _paired(teacher, student, _named_tensors):
        if t.is_floating_point() and decay > 0.0:
            lerp_t.append(t)
            lerp_s.append(s.detach().to(dtype=t.dtype))
        else:
            t.copy_(s)
    if lerp_t:
        # One fused kernel per device and dtype: the update is a small share of a training step.
        torch._foreach_lerp_(lerp_t, lerp_s, 1.0 - decay)
    return teacher


def copy_weights_(teacher, student):
    """Every parameter and buffer of ``student`` copied into ``teacher`` (an EMA step with decay 0)."""
    return ema_update_(teacher, student, 0.0)
