"""COCO mask / box AP through a compiled COCOeval: the ``faster-coco-eval`` package (pinned in
requirements/base.txt), with pycocotools' pure-Python COCOeval as the fallback where it is not importable. Both
give the same AP figures (tests/evaluation/test_coco_eval.py); ``benchmarks/coco_eval_speed.py`` times them.

Detectron2's own fast COCOeval needs its compiled ``detectron2._C``, which does not load with current torch.
"""
import contextlib
import io
import logging
import threading
from unittest import mock

from detectron2.evaluation import COCOEvaluator, coco_evaluation

__all__ = ["FastCOCOEvaluator", "compiled_cocoeval"]

logger = logging.getLogger(__name__)
_SWAP_LOCK = threading.Lock()


def compiled_cocoeval():
    """faster-coco-eval's ``COCOeval_faster`` class, or ``None`` where the package is not importable."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


def _evaluate_with(compiled):
    """Detectron2's ``_evaluate_predictions_on_coco`` for boxes and masks through ``compiled``; keypoints and a
    custom detection limit go to Detectron2's own (with pycocotools' COCOeval).

    Unlike Detectron2's, it copies each mask result once, without its box (so that a mask's own area decides
    its size range), where Detectron2 deep-copies them: 40% of a compiled mask evaluation's time."""
    original = coco_evaluation._evaluate_predictions_on_coco

    def evaluate(coco_gt, coco_results, iou_type, kpt_oks_sigmas=None, cocoeval_fn=None, img_ids=None,
                 max_dets_per_image=None):
        max_dets = list(max_dets_per_image) if max_dets_per_image is not None else [1, 10, 100]
        if iou_type not in ("bbox", "segm") or len(max_dets) < 3 or max_dets[2] != 100:
            return original(coco_gt, coco_results, iou_type, kpt_oks_sigmas=kpt_oks_sigmas,
                            cocoeval_fn=coco_evaluation.COCOeval, img_ids=img_ids,
                            max_dets_per_image=max_dets_per_image)
        if iou_type == "segm":
            coco_results = [{k: v for k, v in result.items() if k != "bbox"} for result in coco_results]
        coco_gt, coco_results, img_ids = _integer_image_ids(coco_gt, coco_results, img_ids)
        coco_eval = compiled(coco_gt, coco_gt.loadRes(coco_results), iou_type, print_function=logger.info)
        coco_eval.params.maxDets = max_dets
        if img_ids is not None:
            coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return coco_eval

    return evaluate


def _integer_image_ids(coco_gt, coco_results, img_ids):
    """The compiled COCOeval takes numeric image ids only; Detectron2 datasets may use any (the demo's are file
    stems). Where one is not an integer, every image id is replaced by its index, in a copy of the ground truth
    and of the results (the AP figures do not depend on the ids)."""
    images = coco_gt.dataset.get("images", [])
    if all(isinstance(image["id"], int) for image in images):
        return coco_gt, coco_results, img_ids
    from pycocotools.coco import COCO

    index = {image["id"]: i for i, image in enumerate(images)}
    dataset = dict(coco_gt.dataset)
    dataset["images"] = [{**image, "id": index[image["id"]]} for image in images]
    dataset["annotations"] = [{**a, "image_id": index[a["image_id"]]} for a in coco_gt.dataset.get("annotations", [])]
    renumbered = COCO()
    renumbered.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        renumbered.createIndex()
    results = [{**r, "image_id": index[r["image_id"]]} for r in coco_results]
    return renumbered, results, None if img_ids is None else [index[i] for i in img_ids]


class FastCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (same arguments, results and files) whose COCOeval is the compiled one
    of :func:`compiled_cocoeval`, or pycocotools' where that is missing (``compiled=False`` forces it)."""

    def __init__(self, dataset_name, *args, compiled=True, **kwargs):
        kwargs["use_fast_impl"] = False  # Detectron2's fast path needs detectron2._C
        super().__init__(dataset_name, *args, **kwargs)
        cls = compiled_cocoeval() if compiled else None
        if compiled and cls is None:
            self._logger.info("faster-coco-eval is not installed: COCO AP through pycocotools' COCOeval (slower)")
        self._compiled = cls

    def _eval_predictions(self, predictions, img_ids=None):
        if self._compiled is None:
            return super()._eval_predictions(predictions, img_ids)
        # Detectron2's _eval_predictions prepares the results (dataset class ids, the results file) and calls its
        # module's _evaluate_predictions_on_coco per task: that call is the one swapped, for this call only
        # (under a lock: it is module state).
        with _SWAP_LOCK, mock.patch.object(coco_evaluation, "_evaluate_predictions_on_coco",
                                           _evaluate_with(self._compiled)):
            return super()._eval_predictions(predictions, img_ids)
