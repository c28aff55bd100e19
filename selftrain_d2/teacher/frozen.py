"""The teacher of online distillation: a model kept out of DDP and the optimizer, in eval mode, run
under ``torch.no_grad``, and saved with the trainer's checkpoints under its own name."""
import torch

__all__ = ["FrozenTeacher", "raw_predictions"]


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
