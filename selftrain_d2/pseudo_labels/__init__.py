"""Offline pseudo labels: generation (sharded, resumable), the folder it writes, class balance and test-time
augmentation. Importing it lets DATASETS.PSEUDO_LABEL_FOLDERS register pseudo-label folders."""
from . import config as _config  # noqa: F401  (registers this subsystem's config keys)
from .folder import PseudoLabelFolder, load_pseudo_label_dataset, register_pseudo_label_dataset
from .generate import generate_pseudo_labels, register_teacher_output, scores_to_probabilities, teacher_output
from .storage import (
    hard_label_from_probs,
    load_confidence,
    load_hard_label,
    read_soft_label,
    soft_label_to_dense,
    write_confidence,
    write_hard_label,
    write_soft_label,
)
from .tta import multi_scale_flip, sliding_window

__all__ = [
    "PseudoLabelFolder", "generate_pseudo_labels", "register_pseudo_label_dataset", "load_pseudo_label_dataset",
    "register_teacher_output", "teacher_output", "scores_to_probabilities",
    "hard_label_from_probs", "write_hard_label", "load_hard_label", "write_confidence", "load_confidence",
    "write_soft_label", "read_soft_label", "soft_label_to_dense", "multi_scale_flip", "sliding_window",
]
