"""``SoftSemanticSegmentor``: Detectron2's SemanticSegmentor (same modules and weights) whose head also receives
the batch's soft pseudo labels (self-training paper, appendix A.1), which Detectron2's forward drops."""
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.structures import ImageList

from ..dense_loss import padded_soft_targets

__all__ = ["SoftSemanticSegmentor"]


@META_ARCH_REGISTRY.register()
class SoftSemanticSegmentor(SemanticSegmentor):
    accepts_soft_labels = True  # inputs' "sem_seg_soft_classes" / "sem_seg_soft_probs" (the semantic mapper's)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not getattr(self.sem_seg_head, "accepts_soft_labels", False):
            raise ValueError(
                "MODEL.META_ARCHITECTURE SoftSemanticSegmentor needs a head that trains on soft labels; "
                f"MODEL.SEM_SEG_HEAD.NAME {type(self.sem_seg_head).__name__} does not "
                "(DeepLabV3PlusGlobalPoolHead does)"
            )

    def forward(self, batched_inputs):
        if not self.training or not any("sem_seg_soft_probs" in x for x in batched_inputs):
            return super().forward(batched_inputs)
        divisibility, constraints = self.backbone.size_divisibility, self.backbone.padding_constraints
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, divisibility, padding_constraints=constraints)
        features = self.backbone(images.tensor)
        targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
        targets = ImageList.from_tensors(targets, divisibility, self.sem_seg_head.ignore_value, constraints).tensor
        soft = padded_soft_targets(batched_inputs, divisibility, self.device, constraints)
        _, losses = self.sem_seg_head(features, targets, soft_targets=soft)
        return losses
