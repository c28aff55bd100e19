"""The meta-architecture "Distiller": a student trained beside a frozen teacher with KD losses.

- The student is any registered meta-architecture (``DISTILL.STUDENT_META_ARCHITECTURE``) built from this
  config, so a KD config is the student's config plus ``MODEL.META_ARCHITECTURE: "Distiller"`` and ``DISTILL.*``.
- The teacher is built from its own config file (``DISTILL.TEACHER.CONFIG``) with its weights
  (``DISTILL.TEACHER.WEIGHTS``). It is not a registered submodule: it never enters ``state_dict`` (so the
  student's checkpoint does not carry it), the optimizer, DDP, or ``train()``; it stays in eval mode with
  ``requires_grad`` False and runs under ``torch.no_grad``. ``.to()`` / ``.cuda()`` still move it.
- Feature taps (forward hooks, ``DISTILL.TAPS``) take named maps from both; a student map whose channel
  count differs from the teacher's goes through a learned 1x1 adapter when a loss compares channels.
- Training: ``{student's own losses} + {"loss_kd_<name>": weight x KD term}``; the adapters and the losses'
  modules (the holistic loss's critic and its optimizer state) are submodules, saved with the student.
- Inference is the student's alone.

``MODEL.WEIGHTS`` may hold a Distiller checkpoint or a plain student checkpoint (keys without the
``student.`` prefix), e.g. a student pretrained without KD.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ..teacher.frozen import build_frozen_teacher, load_teacher_config
from ..utils.precision import autocast_off
from .losses import KDInputs, build_kd_losses
from .taps import FeatureTaps, make_adapters, probe_channels

__all__ = ["Distiller", "build_teacher", "kd_loss_terms", "parse_taps", "probe_size"]

_OWN_PREFIXES = ("student.", "adapters.", "kd_losses.")


def parse_taps(entries, needed):
    """``DISTILL.TAPS`` ([[NAME, STUDENT_MODULE, TEACHER_MODULE], ...]) as two ``{name: module}`` dicts,
    restricted to the tap names in ``needed``; unknown names and malformed entries fail naming the key."""
    student, teacher = {}, {}
    for entry in entries:
        if len(entry) != 3 or not all(isinstance(e, str) and e for e in entry):
            raise ValueError(f"DISTILL.TAPS entry {list(entry)}: expected [NAME, STUDENT_MODULE, TEACHER_MODULE]")
        name, s, t = entry
        if name in student:
            raise ValueError(f"DISTILL.TAPS names {name!r} twice")
        student[name], teacher[name] = s, t
    missing = sorted(set(needed) - set(student))
    if missing:
        raise ValueError(
            f"the KD losses read taps {missing}, which DISTILL.TAPS does not define (it has {sorted(student)})"
        )
    return {n: student[n] for n in needed}, {n: teacher[n] for n in needed}


def probe_size(cfg):
    """(H, W) of the zero image used to read tap channel counts: ``DISTILL.PROBE_SIZE``, else the absolute
    training crop (heads with a fixed pooling window accept only that size), else 256 x 256."""
    if cfg.DISTILL.PROBE_SIZE:
        return tuple(cfg.DISTILL.PROBE_SIZE)
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
        return tuple(cfg.INPUT.CROP.SIZE)
    return (256, 256)


def build_teacher(cfg):
    """The frozen teacher of ``DISTILL.TEACHER.CONFIG`` on this config's device with ``DISTILL.TEACHER.WEIGHTS``
    (:func:`selftrain_d2.teacher.build_frozen_teacher`), and its config."""
    t = cfg.DISTILL.TEACHER
    tcfg = load_teacher_config(t.CONFIG, cfg.MODEL.DEVICE, "DISTILL.TEACHER.CONFIG")
    if tcfg.MODEL.META_ARCHITECTURE == "Distiller":
        raise ValueError(f"DISTILL.TEACHER.CONFIG {t.CONFIG} builds a Distiller; the teacher must be a plain model")
    if tcfg.INPUT.FORMAT != cfg.INPUT.FORMAT:
        raise ValueError(
            f"the teacher ({t.CONFIG}) reads INPUT.FORMAT {tcfg.INPUT.FORMAT!r} but the student's images are "
            f"{cfg.INPUT.FORMAT!r}: they see the same image tensors, so the formats must agree"
        )
    return build_frozen_teacher(tcfg, t.WEIGHTS, key="DISTILL.TEACHER.WEIGHTS", required=False), tcfg


def _size_divisibility(model):
    value = getattr(model, "size_divisibility", None)
    if value is None:
        value = getattr(getattr(model, "backbone", None), "size_divisibility", 0)
    return int(value or 0)


def kd_loss_terms(kd_losses, student_maps, teacher_maps, inputs, taken=()):
    """The loss terms of ``kd_losses`` on aligned student / teacher maps ({tap: N x C x H x W}), computed in
    float32 with autocast off: under mixed precision, softmaxes with a temperature, cosine similarities and
    per-class sums over every pixel of a map are not float16-safe, and the holistic critic takes its own
    (unscaled) step. A term whose name is in ``taken`` (the student's own losses) is an error."""
    device = next(iter(student_maps.values())).device
    terms = {}
    with autocast_off(device):
        student_maps = {tap: m.float() for tap, m in student_maps.items()}
        teacher_maps = {tap: m.float() for tap, m in teacher_maps.items()}
        for loss in kd_losses:
            new = loss(student_maps, teacher_maps, inputs)
            clash = set(new) & (set(taken) | set(terms))
            if clash:
                raise ValueError(f"KD loss {loss.name!r} returns {sorted(clash)}, which the student or another KD "
                                 "loss already returns")
            terms.update(new)
    return terms


@META_ARCH_REGISTRY.register()
class Distiller(nn.Module):
    @configurable
    def __init__(self, *, student, teacher, kd_losses, student_taps, teacher_taps, student_probe_size,
                 teacher_probe_size, resize_to="student", ignore_value=255):
        super().__init__()
        if resize_to not in ("student", "teacher"):
            raise ValueError(f"DISTILL.RESIZE_TO={resize_to!r}: use 'student' or 'teacher'")
        self.student = student
        # A plain attribute, not a submodule: see the module docstring.
        object.__setattr__(self, "teacher", teacher)
        self.kd_losses = kd_losses
        self.student_taps = FeatureTaps(student, student_taps, "the student")
        self.teacher_taps = FeatureTaps(teacher, teacher_taps, "the teacher")
        self.student_channels = probe_channels(student, self.student_taps, student_probe_size)
        self.teacher_channels = probe_channels(teacher, self.teacher_taps, teacher_probe_size)
        adapted = sorted({tap for loss in kd_losses.values() for tap in loss.adapted_taps})
        self.adapters = make_adapters(self.student_channels, self.teacher_channels, adapted)
        self.adapters.to(self.device)
        self.resize_to = resize_to
        self.ignore_value = ignore_value
        self.size_divisibility = _size_divisibility(student)
        self._register_load_state_dict_pre_hook(self._accept_student_checkpoint)

    @classmethod
    def from_config(cls, cfg):
        name = cfg.DISTILL.STUDENT_META_ARCHITECTURE
        if name == "Distiller":
            raise ValueError("DISTILL.STUDENT_META_ARCHITECTURE cannot be 'Distiller'")
        student = META_ARCH_REGISTRY.get(name)(cfg)
        student.to(torch.device(cfg.MODEL.DEVICE))
        teacher, tcfg = build_teacher(cfg)
        kd_losses = build_kd_losses(cfg)
        needed = sorted({tap for loss in kd_losses.values() for tap in loss.taps})
        student_taps, teacher_taps = parse_taps(cfg.DISTILL.TAPS, needed)
        return {
            "student": student,
            "teacher": teacher,
            "kd_losses": kd_losses.to(torch.device(cfg.MODEL.DEVICE)),
            "student_taps": student_taps,
            "teacher_taps": teacher_taps,
            "student_probe_size": probe_size(cfg),
            "teacher_probe_size": probe_size(tcfg),
            "resize_to": cfg.DISTILL.RESIZE_TO,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    @property
    def device(self):
        return next(self.student.parameters()).device

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() reach the teacher although it is not a submodule.
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    @staticmethod
    def _accept_student_checkpoint(state_dict, prefix, *args):
        """Load a plain student checkpoint (no ``student.`` prefixes) into the student."""
        own = [k for k in state_dict if k.startswith(prefix)]
        if own and not any(k[len(prefix):].startswith(_OWN_PREFIXES) for k in own):
            for k in own:
                state_dict[f"{prefix}student.{k[len(prefix):]}"] = state_dict.pop(k)

    def _kd_inputs(self, batched_inputs, need_images):
        labels = images = None
        if all("sem_seg" in x for x in batched_inputs):
            labels = [x["sem_seg"].to(self.device) for x in batched_inputs]
            labels = ImageList.from_tensors(labels, self.size_divisibility, pad_value=self.ignore_value).tensor.long()
        if need_images:
            mean, std = self.student.pixel_mean, self.student.pixel_std
            images = [(x["image"].to(self.device) - mean) / std for x in batched_inputs]
            images = ImageList.from_tensors(images, self.size_divisibility).tensor
        return KDInputs(labels, images, self.ignore_value)

    def _align(self, student_maps, teacher_maps):
        """Adapted student maps and teacher maps, resized (bilinearly) to one size per tap."""
        s_out, t_out = {}, {}
        for tap, s in student_maps.items():
            t = teacher_maps[tap]
            if tap in self.adapters:
                s = self.adapters[tap](s)
            if s.shape[-2:] != t.shape[-2:]:
                if self.resize_to == "student":
                    t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
                else:
                    s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            s_out[tap], t_out[tap] = s, t
        return s_out, t_out

    def forward(self, batched_inputs):
        if not self.training:
            return self.student(batched_inputs)
        with self.student_taps.capture() as student_maps:
            losses = dict(self.student(batched_inputs))
        # Only the image: the teacher's inference path then needs no resizing to the original size.
        with torch.no_grad(), self.teacher_taps.capture() as teacher_maps:
            self.teacher([{"image": x["image"]} for x in batched_inputs])
        student_maps, teacher_maps = self._align(student_maps, teacher_maps)
        inputs = self._kd_inputs(batched_inputs, any(loss.needs_images for loss in self.kd_losses.values()))
        losses.update(kd_loss_terms(self.kd_losses.values(), student_maps, teacher_maps, inputs, taken=losses))
        return losses
