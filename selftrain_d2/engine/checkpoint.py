"""The trainer's checkpointer: safe loading, atomic saving, verified resume, and class transfer.

:class:`Checkpointer` is Detectron2's ``DetectionCheckpointer`` (through
:class:`~selftrain_d2.utils.safe_load.SafeCheckpointer`: no code runs while loading) with

- every checkpoint and ``last_checkpoint`` written to a temporary file, fsync'ed and renamed, so a kill
  leaves the previous file or none, never a truncated one;
- ``resume_or_load(resume=True)`` that loads the checkpoint ``last_checkpoint`` names if it loads, and
  otherwise the newest ``.pth`` of the folder that does, saying so (an empty, broken or stale
  ``last_checkpoint`` included);
- :meth:`Checkpointer.ensure_loadable`, with which a run resumed at its last iteration rewrites a missing
  or broken ``model_final.pth`` from the restored state.

Loading a checkpoint trained on other classes: the class-sized rows are remapped by class name.

Cross-domain finetuning (the paper's section 3.4) starts from a model trained on the source classes and
finetunes on a few target labels whose class set differs. The head is built for the target classes; this
module carries over what the two class lists share:

- :func:`transfer_class_weights` (pure): every checkpoint tensor with ``len(source)`` rows whose model
  counterpart has ``len(target)`` rows (or ``+1`` each: a trailing no-object row, as in Mask2Former's
  ``class_embed``) is rebuilt in the target order; a target class found among the source classes gets its
  row, a new class keeps the model's fresh initialisation, the no-object row is copied.
- :class:`ClassTransferCheckpointer`: a :class:`Checkpointer` that applies it when loading
  ``MODEL.WEIGHTS`` for a new run, never when resuming the run's own checkpoint.

Class names are matched ignoring letter case and surrounding spaces ("Car" is "car").
"""
import logging
import os

import torch
from detectron2.data import MetadataCatalog

from ..utils.io import atomic_write, atomic_write_text, remove_temporaries
from ..utils.safe_load import SafeCheckpointer, WeightsFileError, load_torch_weights, weights_file_problem

__all__ = [
    "Checkpointer",
    "ClassTransferCheckpointer",
    "NoLoadableCheckpointError",
    "build_checkpointer",
    "target_classes_of",
    "transfer_class_weights",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"


class NoLoadableCheckpointError(WeightsFileError):
    """``--resume`` found ``last_checkpoint`` but no checkpoint in the folder that loads."""


class Checkpointer(SafeCheckpointer):
    """``DetectionCheckpointer`` that saves atomically and resumes from a checkpoint that loads (see the
    module docstring). Saving costs one fsync of the file and one of the folder per checkpoint."""

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self._preloaded = None  # (path, data) read while choosing the checkpoint to resume

    def save(self, name, **kwargs):
        # fvcore's Checkpointer.save, writing through atomic_write instead of into the final name.
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_write(path) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=False)
        return self.resume()[1]

    def resume(self, checkpointables=None):
        """Load the checkpoint :meth:`resumable_checkpoint` chooses (read once); returns its path and what
        :meth:`load` returns (the checkpoint's entries no checkpointable took)."""
        self._preloaded = self.resumable_checkpoint()
        try:
            return self._preloaded[0], self.load(self._preloaded[0], checkpointables=checkpointables)
        finally:
            self._preloaded = None

    def remove_interrupted_saves(self):
        """Remove the temporary files (checkpoint-sized) of saves that were killed; only for the run that
        is about to write into ``save_dir``, as a live run's save in progress would lose its file."""
        if self.save_dir and self.save_to_disk:
            for tmp in remove_temporaries(self.save_dir, "*.pth") + remove_temporaries(self.save_dir, LAST_CHECKPOINT):
                logger.info(f"Removed {tmp}, left by a save that was interrupted")

    def resumable_checkpoint(self):
        """``(path, data)`` of the checkpoint to resume from: the one ``last_checkpoint`` names if it loads,
        else the newest ``.pth`` of ``save_dir`` (by modification time) that does, with a warning. Raises
        :class:`NoLoadableCheckpointError` naming every file tried when none loads."""
        tag = os.path.join(self.save_dir, LAST_CHECKPOINT)
        named = self.get_checkpoint_file()
        if not os.path.basename(named):
            named = None
        others = sorted((p for p in self.get_all_checkpoint_files() if p != named), key=_mtime, reverse=True)
        failures = []
        for candidate in ([named] if named else []) + others:
            try:
                data = load_torch_weights(candidate)
            except WeightsFileError as e:
                failures.append(str(e))
                continue
            if failures or not named:
                logger.warning(
                    "--resume: " + (f"{tag} is empty" if not named else f"{tag} names {named}, which does not load")
                    + (f" ({'; '.join(failures)})" if failures else "")
                    + f"; resuming from {candidate}, the newest checkpoint in {self.save_dir} that loads")
            return candidate, data
        raise NoLoadableCheckpointError(
            f"--resume: {tag} exists but no checkpoint in {self.save_dir} loads ("
            + ("; ".join(failures) or "there is none")
            + f"). Remove {tag} to start the run afresh from MODEL.WEIGHTS")

    def _torch_load(self, f):
        if self._preloaded is not None and os.path.abspath(f) == os.path.abspath(self._preloaded[0]):
            return self._preloaded[1]
        return super()._torch_load(f)

    def ensure_loadable(self, name, **extra):
        """Save ``<name>.pth`` (with ``extra``, as :meth:`save`) from the current state unless ``save_dir``
        holds one that loads: a resumed run at its last iteration repairs a final checkpoint whose write was
        killed. Only where this checkpointer saves (the main process)."""
        if not self.save_dir or not self.save_to_disk:
            return
        problem = weights_file_problem(os.path.join(self.save_dir, f"{name}.pth"))
        if problem is not None:
            logger.warning(f"{problem}: writing it again from the restored state")
            self.save(name, **extra)


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return -1


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


class ClassTransferCheckpointer(Checkpointer):
    """:class:`Checkpointer` that remaps class rows from ``source_classes`` to ``target_classes`` when it
    loads weights for a new run (:meth:`resume_or_load` with nothing to resume, or :meth:`load`). Resuming the
    run's own last checkpoint loads it unchanged. With empty ``source_classes`` it is a plain
    ``Checkpointer``. The last remapping is kept in ``transfer_report``."""

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
    ``DATASETS.TRAIN[0]`` when the former is set, else a plain :class:`Checkpointer`."""
    source = list(cfg.MODEL.CLASS_TRANSFER.SOURCE_CLASSES)
    if not source:
        return Checkpointer(model, save_dir, **checkpointables)
    if not cfg.DATASETS.TRAIN:
        raise ValueError("MODEL.CLASS_TRANSFER.SOURCE_CLASSES is set but DATASETS.TRAIN is empty: no target classes")
    target = target_classes_of(cfg.DATASETS.TRAIN[0])
    return ClassTransferCheckpointer(model, save_dir, source_classes=source, target_classes=target, **checkpointables)
