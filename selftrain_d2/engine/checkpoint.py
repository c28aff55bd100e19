"""Loading a checkpoint trained on other classes: the class-sized rows are remapped by class name.

Cross-domain finetuning (the paper's section 3.4) starts from a model trained on the source classes and
finetunes on a few target labels whose class set differs. The head is built for the target classes; this
module carries over what the two class lists share:

- :func:`transfer_class_weights` (pure): every checkpoint tensor with ``len(source)`` rows whose model
  counterpart has ``len(target)`` rows (or ``+1`` each: a trailing no-object row, as in Mask2Former's
  ``class_embed``) is rebuilt in the target order; a target class found among the source classes gets its
  row, a new class keeps the model's fresh initialisation, the no-object row is copied.
- :class:`ClassTransferCheckpointer`: a ``DetectionCheckpointer`` that applies it when loading
  ``MODEL.WEIGHTS`` for a new run, never when resuming the run's own checkpoint.

Class names are matched ignoring letter case and surrounding spaces ("Car" is "car").
"""
import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog

__all__ = ["ClassTransferCheckpointer", "build_checkpointer", "target_classes_of", "transfer_class_weights"]

logger = logging.getLogger(__name__)


def _normalise(name):
    return str(name).strip().casefold()


def _index(classes, what):
    index = {}
    for i, name in enumerate(classes):
        key = _normalise(name)
        if key in index:
            raise ValueError(f"{what} classes list {name!r} twice (ignoring case): {list(classes)}")
        index[key] = i
    return index


def transfer_class_weights(state_dict, model_state, source_classes, target_classes):
    """Remap the class-sized tensors of ``state_dict`` (source order) to ``target_classes``.

    ``model_state``: the freshly built model's state dict (target shapes, fresh values for new classes).
    Only keys present in both, with equal shapes beyond the first dimension, are considered; a key
    ``module.<k>`` of the checkpoint is matched to the model's ``<k>``. Returns ``(new_state_dict, report)``;
    ``report`` has one dict per remapped key: ``key``, ``source_shape``, ``target_shape``, ``copied``
    (``[(target index, source index), ...]``), ``new`` (target class names without a source row) and
    ``no_object`` (whether a trailing row was copied). Other entries are passed through untouched.
    """
    source_index = _index(source_classes, "source")
    _index(target_classes, "target")
    n_source, n_target = len(source_classes), len(target_classes)
    pairs = [(t, source_index[_normalise(name)]) for t, name in enumerate(target_classes)
             if _normalise(name) in source_index]
    new_names = [name for name in target_classes if _normalise(name) not in source_index]
    out = dict(state_dict)
    report = []
    for key, value in state_dict.items():
        model_key = key if key in model_state else key[len("module."):] if key.startswith("module.") else key
        fresh = model_state.get(model_key)
        if not (torch.is_tensor(value) and torch.is_tensor(fresh)) or value.ndim == 0 or fresh.ndim == 0:
            continue
        if value.shape[1:] != fresh.shape[1:]:
            continue
        rows = (value.shape[0], fresh.shape[0])
        if rows == (n_source, n_target):
            no_object = False
        elif rows == (n_source + 1, n_target + 1):
            no_object = True
        else:
            continue
        remapped = fresh.detach().clone().to(dtype=value.dtype, device=value.device)
        for t, s in pairs:
            remapped[t] = value[s]
        if no_object:
            remapped[n_target] = value[n_source]
        out[key] = remapped
        report.append({
            "key": key,
            "source_shape": tuple(value.shape),
            "target_shape": tuple(remapped.shape),
            "copied": list(pairs),
            "new": list(new_names),
            "no_object": no_object,
        })
    return out, report


def target_classes_of(dataset_name):
    """The class list a model trained on ``dataset_name`` predicts: ``stuff_classes`` for semantic
    datasets (``evaluator_type`` containing "sem_seg", or no ``thing_classes``), else ``thing_classes``."""
    meta = MetadataCatalog.get(dataset_name)
    evaluator = meta.get("evaluator_type", "") or ""
    evaluator = " ".join(evaluator) if isinstance(evaluator, (list, tuple)) else str(evaluator)
    things = meta.get("thing_classes", None)
    key = "stuff_classes" if "sem_seg" in evaluator or not things else "thing_classes"
    classes = meta.get(key, None)
    if not classes:
        raise KeyError(
            f"MODEL.CLASS_TRANSFER needs the target classes, but dataset {dataset_name!r} has no {key} in its "
            "metadata (DATASETS.TRAIN[0] gives the target classes)."
        )
    return list(classes)


class ClassTransferCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that remaps class rows from ``source_classes`` to ``target_classes`` when it
    loads weights for a new run (:meth:`resume_or_load` with nothing to resume, or :meth:`load`). Resuming the
    run's own last checkpoint loads it unchanged. With empty ``source_classes`` it is a plain
    ``DetectionCheckpointer``. The last remapping is kept in ``transfer_report``."""

    def __init__(self, model, save_dir="", *, source_classes=(), target_classes=(), **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.source_classes = list(source_classes)
        self.target_classes = list(target_classes)
        self.transfer_report = None
        self._resuming = False

    def resume_or_load(self, path, *, resume=True):
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def _load_model(self, checkpoint):
        if self.source_classes and not self._resuming:
            self._convert_ndarray_to_tensor(checkpoint["model"])  # Detectron2 / model-zoo .pkl files hold numpy
            checkpoint["model"], self.transfer_report = transfer_class_weights(
                checkpoint["model"], self.model.state_dict(), self.source_classes, self.target_classes
            )
            self._log_report()
        return super()._load_model(checkpoint)

    def _log_report(self):
        n_source, n_target = len(self.source_classes), len(self.target_classes)
        if not self.transfer_report:
            logger.warning(
                f"MODEL.CLASS_TRANSFER: no checkpoint tensor has {n_source} (or {n_source + 1}) rows where the model "
                f"has {n_target} (or {n_target + 1}); nothing was remapped. Check SOURCE_CLASSES against the weights."
            )
            return
        first = self.transfer_report[0]
        logger.info(
            f"MODEL.CLASS_TRANSFER: remapped {len(self.transfer_report)} tensors from {n_source} to {n_target} "
            f"classes ({', '.join(r['key'] for r in self.transfer_report)}); {len(first['copied'])} classes kept "
            f"their weights, new classes with fresh weights: {first['new'] or 'none'}."
        )


def build_checkpointer(cfg, model, save_dir, **checkpointables):
    """The trainer's checkpointer: class transfer from ``MODEL.CLASS_TRANSFER.SOURCE_CLASSES`` to the classes of
    ``DATASETS.TRAIN[0]`` when the former is set, else a plain ``DetectionCheckpointer``."""
    source = list(cfg.MODEL.CLASS_TRANSFER.SOURCE_CLASSES)
    if not source:
        return DetectionCheckpointer(model, save_dir, **checkpointables)
    if not cfg.DATASETS.TRAIN:
        raise ValueError("MODEL.CLASS_TRANSFER.SOURCE_CLASSES is set but DATASETS.TRAIN is empty: no target classes")
    target = target_classes_of(cfg.DATASETS.TRAIN[0])
    return ClassTransferCheckpointer(model, save_dir, source_classes=source, target_classes=target, **checkpointables)
