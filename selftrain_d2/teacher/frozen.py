"""Teachers: the one way a teacher model is built from its config and weights (guided distillation, KD and
pseudo labelling all use :func:`build_frozen_teacher`), and the teacher of online distillation, a model kept
out of DDP and the optimizer, in eval mode, run under ``torch.no_grad``, and saved with the trainer's
checkpoints under its own name."""
import logging
import os

import torch

from ..config import load_config
from ..modeling import build_model
from ..utils.safe_load import SafeCheckpointer

__all__ = ["FrozenTeacher", "build_frozen_teacher", "load_teacher_config", "load_teacher_weights", "raw_predictions"]

logger = logging.getLogger(__name__)


def load_teacher_config(config_file, device, key):
    """The teacher's config read from ``config_file`` (the value of the config key ``key``, named in errors),
    on ``device`` (the student's ``MODEL.DEVICE``)."""
    if not config_file:
        raise ValueError(f"{key} is empty: name the teacher's config file")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{key}: config file not found: {config_file} (cwd {os.getcwd()})")
    tcfg = load_config(config_file)
    tcfg.defrost()
    tcfg.MODEL.DEVICE = device
    return tcfg


def load_teacher_weights(model, weights, key):
    """Load ``weights`` (the value of config key ``key``, named in errors) into ``model``; nothing in a .pth /
    .pkl can run code."""
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"{key}: checkpoint not found: {weights}")
    SafeCheckpointer(model).load(weights)


def build_frozen_teacher(cfg, weights, key="MODEL.WEIGHTS", required=True):
    """The model of ``cfg`` on its ``MODEL.DEVICE`` with ``weights`` loaded (nothing in a .pth / .pkl can run
    code), in eval mode, every parameter with ``requires_grad`` False. Empty ``weights``: an error naming the
    config key ``key`` when ``required``, else a warning (the teacher keeps its initial weights, e.g. for a
    teacher whose weights a checkpoint loads later)."""
    model = build_model(cfg)
    if weights:
        load_teacher_weights(model, weights, key)
    elif required:
        raise ValueError(f"{key} is empty: the teacher needs trained weights")
    else:
        logger.warning("%s is empty: the teacher keeps its initial weights", key)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def raw_predictions(model, batched_inputs):
    """A mask-classification model's per-query outputs before post-processing:
    ``({"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], ...}, padded (H, W), [(h_i, w_i)])``,
    the masks covering the padded batch tensor at a lower resolution, image i in its top-left (h_i, w_i)."""
    for attr in ("preprocess_image", "backbone", "sem_seg_head"):
        if not hasattr(model, attr):
            raise TypeError(
                f"{type(model).__name__} has no {attr!r}: online pseudo labels need a mask-classification "
                "model (MODEL.META_ARCHITECTURE MaskFormer, Mask2FormerInstance or Mask2FormerSemantic)"
            )
    images = model.preprocess_image(batched_inputs)
    outputs = model.sem_seg_head(model.backbone(images.tensor))
    return outputs, tuple(images.tensor.shape[-2:]), list(images.image_sizes)


class FrozenTeacher:
    """Holds ``model`` frozen: no gradients, never in training mode, not a submodule of anything (so
    no DDP wrapper or optimizer sees it). ``state_dict`` / ``load_state_dict`` are the model's, so a
    checkpointer stores it as a named checkpointable in the same format as a model checkpoint."""

    def __init__(self, model):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def predict(self, batched_inputs):
        """:func:`raw_predictions` of the teacher on ``batched_inputs`` (dicts with ``image``)."""
        if self.model.training:  # someone called .train() on it: the teacher always predicts in eval mode
            self.model.eval()
        return raw_predictions(self.model, batched_inputs)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        return self.model.load_state_dict(state_dict)

    def parameters(self):
        return self.model.parameters()
