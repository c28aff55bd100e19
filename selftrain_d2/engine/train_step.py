"""The one training step of every selftrain-d2 trainer, in full or mixed precision, on any device.

:class:`TrainStep` replaces Detectron2's ``SimpleTrainer`` / ``AMPTrainer`` pair: forward (under
``torch.autocast`` with AMP), then

    scale -> backward -> unscale_ -> clip -> step -> update

in that order, so gradient clipping sees the true gradients whether the optimizer is fused (it would
otherwise receive the loss scale and unscale inside its kernel, after the clip) or foreach. Steps whose
scaled gradients overflowed are skipped by the GradScaler, as it intends, and counted in the log
(``amp/skipped_steps``, ``amp/loss_scale``). Subclasses change what the losses are
(:meth:`TrainStep.next_batch`, :meth:`TrainStep.compute_losses`), never how they are applied.
"""
import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_every_n_seconds

__all__ = ["AmpSettings", "TrainStep", "check_finite_losses", "optimizer_parameters"]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision of the train step: off, or autocast to ``dtype`` on ``device_type``."""

    enabled: bool = False
    dtype: torch.dtype = torch.float16
    device_type: str = "cpu"

    @classmethod
    def from_config(cls, cfg):
        """``SOLVER.AMP.ENABLED`` / ``SOLVER.AMP.DTYPE`` on the device type of ``MODEL.DEVICE``."""
        name = str(cfg.SOLVER.AMP.DTYPE)
        if name not in AMP_DTYPES:
            raise ValueError(f"SOLVER.AMP.DTYPE={name!r}: use one of {sorted(AMP_DTYPES)}")
        return cls(bool(cfg.SOLVER.AMP.ENABLED), AMP_DTYPES[name], torch.device(cfg.MODEL.DEVICE).type)

    @property
    def scaled(self):
        """float16's range needs loss scaling; bfloat16 has float32's exponent range and does not."""
        return self.enabled and self.dtype == torch.float16

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        return torch.amp.GradScaler(self.device_type) if self.scaled else None


def check_finite_losses(loss_dict, iteration):
    """Raise FloatingPointError naming the first non-finite loss term and the iteration (one host read)."""
    if not loss_dict:
        return
    values = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    name, value = next((k, float(v.detach())) for (k, v), ok in zip(loss_dict.items(), finite.tolist()) if not ok)
    raise FloatingPointError(f"Loss term {name!r} is {value} at iteration {iteration}: training stopped. "
                             f"All loss terms: { {k: round(float(v.detach()), 4) for k, v in loss_dict.items()} }")


def optimizer_parameters(optimizer):
    """Every parameter the optimizer updates, once, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class TrainStep(SimpleTrainer):
    """Detectron2's SimpleTrainer with mixed precision and gradient clipping in the step itself.

    Args:
        amp: :class:`AmpSettings` (default: full precision).
        clip: a function clipping the gradients of a list of parameters in place (see
            ``selftrain_d2.solver.build_gradient_clipper``), or None.
        grad_scaler: a ``torch.amp.GradScaler`` to use instead of a new one (float16 AMP only).
    """

    def __init__(self, model, data_loader, optimizer, *, amp=None, clip=None, grad_scaler=None):
        super().__init__(model, data_loader, optimizer)
        self.amp = amp or AmpSettings()
        self.clip = clip
        self.grad_scaler = grad_scaler if grad_scaler is not None else self.amp.grad_scaler()
        self.skipped_steps = 0

    def autocast(self):
        return self.amp.autocast()

    def next_batch(self):
        """What one step trains on (timed as ``data_time``)."""
        return next(self._data_loader_iter)

    def compute_losses(self, batch):
        """The loss terms of one step, ``{name: scalar tensor}``, computed under :meth:`autocast`."""
        with self.autocast():
            loss_dict = self.model(batch)
        return loss_dict if isinstance(loss_dict, dict) else {"total_loss": loss_dict}

    def run_step(self):
        assert self.model.training, f"[{type(self).__name__}] the model was put in eval mode"
        start = time.perf_counter()
        batch = self.next_batch()
        data_time = time.perf_counter() - start

        loss_dict = dict(self.compute_losses(batch))
        check_finite_losses(loss_dict, self.iter)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.apply_gradients()

    def apply_gradients(self):
        """unscale_ -> clip -> step -> update; a step with non-finite scaled gradients is skipped."""
        params = optimizer_parameters(self.optimizer)
        scaler = self.grad_scaler
        if scaler is None:
            if self.clip is not None:
                self.clip(params)
            self.optimizer.step()
            return
        scaler.unscale_(self.optimizer)
        # The inf/NaN flags of unscale_: fused optimizers get them (and no scale) from scaler.step.
        found_inf = sum(scaler._found_inf_per_device(self.optimizer).values())
        if self.clip is not None:
            self.clip(params)
        scaler.step(self.optimizer)
        scale_before = scaler._scale.clone()
        scaler.update()
        found, scale, new_scale = torch.stack(
            [found_inf.to(scale_before), scale_before, scaler._scale.to(scale_before)]).tolist()
        if found:
            self.skipped_steps += 1
            log_every_n_seconds(
                logging.WARNING,
                f"AMP: non-finite gradients at iteration {self.iter}, step skipped; loss scale {scale:g} -> "
                f"{new_scale:g} ({self.skipped_steps} steps skipped so far)", n=60, name=__name__)
        get_event_storage().put_scalars(**{"amp/loss_scale": new_scale, "amp/skipped_steps": self.skipped_steps},
                                        smoothing_hint=False)

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
            ret["amp_skipped_steps"] = self.skipped_steps
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
            self.skipped_steps = int(state_dict.get("amp_skipped_steps", 0))
