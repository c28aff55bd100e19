"""Detectron2's ``SemSegEvaluator`` with the ground truth checked as training checks it.

Detectron2 reads ground-truth maps as they are: an id at or above the class count (that is not the ignore
value) lands in another class's cell of the confusion matrix and changes its IoU without a word. Here every
ground-truth map goes through :func:`selftrain_d2.data.image_io.check_label_ids`: by default such ids are an
error naming the file and the ids; with ``TEST.INVALID_LABEL_IDS "ignore"`` their pixels are counted, left
out like ignore pixels, and reported in one warning at the end.
"""
import logging

import numpy as np
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils import comm

from ..data.image_io import check_label_ids, invalid_label_ids, read_label_map

__all__ = ["CheckedSemSegEvaluator", "INVALID_LABEL_MODES"]

INVALID_LABEL_MODES = ("error", "ignore")

logger = logging.getLogger(__name__)


class CheckedSemSegEvaluator(SemSegEvaluator):
    """``SemSegEvaluator`` whose ground truth holds only class ids and the ignore value.

    ``invalid_labels``: "error" raises ``LabelValueError`` at the first map with other ids; "ignore" evaluates
    their pixels as ignore and counts them (``skipped``: file -> [pixels, ids], all processes after evaluate).
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None, *, invalid_labels="error"):
        if invalid_labels not in INVALID_LABEL_MODES:
            raise ValueError(f"TEST.INVALID_LABEL_IDS must be one of {INVALID_LABEL_MODES}, got {invalid_labels!r}")
        self._invalid_labels = invalid_labels
        self.skipped = {}
        super().__init__(dataset_name, distributed, output_dir, sem_seg_loading_fn=self._load_ground_truth)

    def reset(self):
        super().reset()
        self.skipped = {}

    def _load_ground_truth(self, path, dtype=int):
        label = read_label_map(path)
        if self._invalid_labels == "error":
            check_label_ids(label, path, self._num_classes, self._ignore_label)
            return label.astype(dtype)
        label = label.astype(dtype)  # a copy: the pixels below are changed
        bad = invalid_label_ids(label, self._num_classes, self._ignore_label)
        if bad.any():
            self.skipped[str(path)] = [int(bad.sum()), [int(v) for v in np.unique(label[bad])]]
            label[bad] = self._ignore_label
        return label

    def evaluate(self):
        if self._distributed:
            merged = {}
            for part in comm.all_gather(self.skipped):
                merged.update(part)
            self.skipped = merged
        if self.skipped and comm.is_main_process():
            pixels = sum(p for p, _ in self.skipped.values())
            ids = sorted({i for _, values in self.skipped.values() for i in values})
            shown = "; ".join(f"{path}: {p} px of ids {v[:10]}" for path, (p, v) in list(self.skipped.items())[:5])
            more = f"; ... and {len(self.skipped) - 5} more files" if len(self.skipped) > 5 else ""
            logger.warning(
                "%s: %d ground-truth pixels in %d label files hold ids %s outside the %d classes (and ignore %d); "
                "they were evaluated as ignore (TEST.INVALID_LABEL_IDS ignore): %s%s",
                self._dataset_name, pixels, len(self.skipped), ids[:20], self._num_classes, self._ignore_label,
                shown, more,
            )
        return super().evaluate()
