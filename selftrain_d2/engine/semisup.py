"""Online teacher-student training (guided distillation, after "Guided Distillation for
Semi-Supervised Instance Segmentation").

Every step the student learns from a labeled batch (supervised loss); every ``SEMISUP.UNLABELED_PERIOD``
steps also from an unlabeled batch: the teacher predicts on its weak views under ``no_grad``, the
registered pseudo-label filters turn that into targets, and the student's loss on the strong views
is added with weight ``SEMISUP.UNSUP_LOSS_WEIGHT`` (lambda_u). Which teacher labels iteration ``i``
is a function of ``i`` alone (:class:`TeacherSchedule`):

- ``i < BURN_IN_ITERS``: "guided" mode: the fixed teacher of ``SEMISUP.TEACHER.WEIGHTS``; "plain" mode:
  none (labeled-only burn-in, the baseline the paper compares to);
- ``i == BURN_IN_ITERS``: the teacher takes the student's weights, then after every step follows the
  student as an EMA (``SEMISUP.EMA_DECAY``).

The teacher is a named checkpointable ("teacher"), outside DDP and the optimizer, so ``--resume``
continues mid-burn-in or mid-EMA from the same state; the unlabeled stream is a second seeded
stream whose batch ``k`` is a pure function of (seed, k), like the labeled one.
"""
import logging

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import HookBase, hooks
from detectron2.structures import Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.build import SeededTrainStream, TrainLoader, mix_seed
from ..data.mappers import MAPPER_REGISTRY
from ..modeling import build_model
from ..solver import build_gradient_clipper
from ..teacher import (
    FrozenTeacher, PseudoLabeler, copy_weights_, ema_update_, load_teacher_config, load_teacher_weights,
)
from .checkpoint import Checkpointer
from .ddp import unwrap_ddp
from .train_step import AmpSettings, TrainStep
from .trainer import Trainer

__all__ = [
    "SemiSupervisedTrainer",
    "SemiSupervisedStep",
    "TeacherSchedule",
    "build_unlabeled_loader",
    "evaluate_student_teacher",
]

logger = logging.getLogger(__name__)

MODES = ("guided", "plain")
EMPTY_POLICIES = ("no_object", "zero_if_all_empty")
EVAL_MODELS = ("STUDENT", "TEACHER", "BOTH")


def build_unlabeled_loader(cfg, seed):
    """Batches of weak/strong views of ``DATASETS.TRAIN_UNLABELED`` (``SEMISUP.UNLABELED_MAPPER_NAME``):
    a :class:`SeededTrainStream` of its own, seeded from (``seed``, ``SEMISUP.UNLABELED_SEED_OFFSET``)."""
    ss = cfg.SEMISUP
    names = list(cfg.DATASETS.TRAIN_UNLABELED)
    if not names:
        raise ValueError("SemiSupervisedTrainer needs unlabeled images: DATASETS.TRAIN_UNLABELED is empty")
    dicts = get_detection_dataset_dicts(names, filter_empty=False)
    if ss.UNLABELED_MAPPER_NAME not in MAPPER_REGISTRY:
        raise KeyError(f"SEMISUP.UNLABELED_MAPPER_NAME: no mapper {ss.UNLABELED_MAPPER_NAME!r}; registered: "
                       f"{sorted(k for k, _ in MAPPER_REGISTRY)}")
    mapper = MAPPER_REGISTRY.get(ss.UNLABELED_MAPPER_NAME)(cfg, True)
    world = comm.get_world_size()
    if ss.UNLABELED_IMS_PER_BATCH % world or ss.UNLABELED_IMS_PER_BATCH <= 0:
        raise ValueError(f"SEMISUP.UNLABELED_IMS_PER_BATCH={ss.UNLABELED_IMS_PER_BATCH} must be a positive multiple "
                         f"of the {world} processes")
    stream = SeededTrainStream(
        dicts, mapper, ss.UNLABELED_IMS_PER_BATCH // world, seed=mix_seed(seed, ss.UNLABELED_SEED_OFFSET),
        rank=comm.get_rank(), world_size=world, skip_unreadable=cfg.DATALOADER.SKIP_UNREADABLE,
    )
    return TrainLoader(stream, cfg.DATALOADER.NUM_WORKERS, seed)


class TeacherSchedule(HookBase):
    """Which teacher labels the unlabeled batch of each iteration, and the teacher's updates.

    Holds no phase state of its own: everything follows from the iteration, ``burn_in_iters`` and
    ``mode``, so a resumed run (whose teacher weights come from the checkpoint) repeats the original.
    """

    def __init__(self, *, teacher, guide, mode, burn_in_iters, decay):
        if mode not in MODES:
            raise ValueError(f"SEMISUP.MODE must be one of {MODES}, got {mode!r}")
        self.teacher = teacher  # the student's architecture: copied at burn_in_iters, then EMA
        self.guide = guide  # the fixed burn-in teacher (may be ``teacher`` itself); None in plain mode
        self.mode = mode
        self.burn_in_iters = int(burn_in_iters)
        self.decay = float(decay)

    def in_burn_in(self, iteration):
        return iteration < self.burn_in_iters

    def teacher_at(self, iteration):
        """The FrozenTeacher labelling iteration ``iteration``'s unlabeled batch, or None (plain burn-in)."""
        if self.in_burn_in(iteration):
            return self.guide if self.mode == "guided" else None
        return self.teacher

    def before_step(self):
        if self.trainer.iter == self.burn_in_iters:
            copy_weights_(self.teacher.model, self.trainer.model)
            logger.info(f"Iteration {self.trainer.iter}: end of burn-in, the teacher takes the student's weights "
                        f"and follows them with EMA decay {self.decay}")
        if self.trainer.iter >= self.burn_in_iters and self.guide is not self.teacher:
            self.guide = None  # a separate burn-in teacher is not needed any more

    def after_step(self):
        if self.trainer.iter >= self.burn_in_iters:
            ema_update_(self.teacher.model, self.trainer.model, self.decay)


class SemiSupervisedStep(TrainStep):
    """One training step: supervised loss on a labeled batch, plus lambda_u x the loss on the strong
    views of an unlabeled batch against the teacher's pseudo labels for the weak views. How the losses
    are applied (AMP, clipping) is :class:`TrainStep`'s."""

    def __init__(self, model, data_loader, optimizer, *, unlabeled_loader, labeler, schedule, unsup_weight,
                 unlabeled_period, empty_pseudo_labels="no_object", amp=None, clip=None, grad_scaler=None):
        super().__init__(model, data_loader, optimizer, amp=amp, clip=clip, grad_scaler=grad_scaler)
        if unlabeled_period < 1:
            raise ValueError(f"SEMISUP.UNLABELED_PERIOD must be >= 1, got {unlabeled_period}")
        if empty_pseudo_labels not in EMPTY_POLICIES:
            raise ValueError(f"SEMISUP.EMPTY_PSEUDO_LABELS must be one of {EMPTY_POLICIES}, "
                             f"got {empty_pseudo_labels!r}")
        self.empty_pseudo_labels = empty_pseudo_labels
        self.unlabeled_loader = unlabeled_loader
        self.labeler = labeler
        self.schedule = schedule
        self.unsup_weight = float(unsup_weight)
        self.unlabeled_period = int(unlabeled_period)
        self._unlabeled_iter = None
        self._unlabeled_next = None  # index of the batch the iterator gives next

    def reset_unlabeled(self, seed=None):
        """Forget the unlabeled iterator (the next draw starts at the batch its iteration asks for)."""
        if seed is not None:
            self.unlabeled_loader.set_start_iter(0, seed=seed)
        self._unlabeled_iter = self._unlabeled_next = None

    def _unlabeled_batch(self, iteration):
        # Batch k = iteration // period, whatever ran before: plain burn-in skips batches, resume starts late.
        index = iteration // self.unlabeled_period
        if self._unlabeled_iter is None or self._unlabeled_next != index:
            self.unlabeled_loader.set_start_iter(index)
            self._unlabeled_iter = iter(self.unlabeled_loader)
        batch = next(self._unlabeled_iter)
        self._unlabeled_next = index + 1
        return batch

    def student_inputs(self, unlabeled, targets):
        """Strong views with the pseudo labels as training targets."""
        inputs = []
        for record, target in zip(unlabeled, targets):
            x = {"image": record["image_strong"]}
            if self.labeler.targets == "semantic":
                x["sem_seg"] = target
            else:
                inst = Instances(tuple(record["image_strong"].shape[-2:]))
                inst.gt_classes = target["labels"]
                inst.gt_masks = target["masks"]
                x["instances"] = inst
            inputs.append(x)
        return inputs

    def unsupervised_losses(self, teacher, unlabeled):
        """``{name + "_unsup": lambda_u x loss}`` of the student on the strong views. An image without pseudo
        objects trains its queries to "no object" (as the reference); with ``empty_pseudo_labels``
        "zero_if_all_empty" the losses are zeros (still in the graph) when this process's batch has none."""
        with torch.no_grad(), self.autocast():
            outputs, pad_size, sizes = teacher.predict([{"image": r["image"]} for r in unlabeled])
        targets = self.labeler(outputs, pad_size, sizes)
        empty = [self.labeler.is_empty(t) for t in targets]
        storage = get_event_storage()
        if self.labeler.targets == "instance":
            storage.put_scalar("semisup/pseudo_objects_per_image", float(np.mean([len(t["labels"]) for t in targets])))
        storage.put_scalar("semisup/empty_pseudo_label_share", float(np.mean(empty)))
        with self.autocast():
            losses = self.model(self.student_inputs(unlabeled, targets))
        # The forward runs even when all are empty, so every process makes the same collective calls.
        weight = self.unsup_weight
        if self.empty_pseudo_labels == "zero_if_all_empty" and all(empty):
            weight = 0.0
        return {f"{k}_unsup": v * weight for k, v in losses.items()}

    def next_batch(self):
        """(labeled batch, the teacher of this iteration or None, its unlabeled batch or None)."""
        labeled = next(self._data_loader_iter)
        teacher = None
        if self.iter % self.unlabeled_period == 0:
            teacher = self.schedule.teacher_at(self.iter)
        unlabeled = self._unlabeled_batch(self.iter) if teacher is not None else None
        return labeled, teacher, unlabeled

    def compute_losses(self, batch):
        labeled, teacher, unlabeled = batch
        loss_dict = super().compute_losses(labeled)
        if teacher is not None:
            loss_dict.update(self.unsupervised_losses(teacher, unlabeled))
        return loss_dict


def _eval_model_choice(cfg):
    which = str(cfg.SEMISUP.EVAL_MODEL).upper()
    if which not in EVAL_MODELS:
        raise ValueError(f"SEMISUP.EVAL_MODEL must be one of {EVAL_MODELS}, got {cfg.SEMISUP.EVAL_MODEL!r}")
    return which


def evaluate_student_teacher(trainer_cls, cfg, student, teacher_model):
    """``SEMISUP.EVAL_MODEL``'s evaluator results: the student's or the teacher's; for BOTH the
    student's, with the teacher's beside them under keys prefixed ``teacher/``."""
    which = _eval_model_choice(cfg)
    if which == "TEACHER":
        return trainer_cls.test(cfg, teacher_model)
    results = trainer_cls.test(cfg, student)
    if which == "BOTH":
        results = dict(results)
        results.update({f"teacher/{k}": v for k, v in trainer_cls.test(cfg, teacher_model).items()})
    return results


class SemiSupervisedTrainer(Trainer):
    """The Trainer with a teacher: guided (or plain) burn-in, then an EMA teacher. Chosen with
    ``SELFTRAIN.TRAINER: SemiSupervisedTrainer``; settings under ``SEMISUP``."""

    def build_train_step(self, cfg, model, data_loader, optimizer):
        """The semi-supervised step, with the teacher (an EMA of the student after burn-in) and, for guided
        burn-in, the fixed teacher whose weights :meth:`resume_or_load` loads."""
        ss = cfg.SEMISUP
        _eval_model_choice(cfg)
        if ss.MODE not in MODES:
            raise ValueError(f"SEMISUP.MODE must be one of {MODES}, got {ss.MODE!r}")
        student = unwrap_ddp(model)
        self.teacher = FrozenTeacher(build_model(cfg))
        guide = None
        if ss.MODE == "guided" and ss.BURN_IN_ITERS > 0:
            if not ss.TEACHER.WEIGHTS:
                raise ValueError("SEMISUP.MODE 'guided' with BURN_IN_ITERS > 0 needs SEMISUP.TEACHER.WEIGHTS: the "
                                 "checkpoint of a teacher trained on the labeled split (tools/train_net.py)")
            guide = self.teacher
            if ss.TEACHER.CONFIG:  # its weights are loaded by resume_or_load, before a checkpoint's
                tcfg = load_teacher_config(ss.TEACHER.CONFIG, cfg.MODEL.DEVICE, "SEMISUP.TEACHER.CONFIG")
                guide = FrozenTeacher(build_model(tcfg))
            if guide.model.sem_seg_head.num_classes != student.sem_seg_head.num_classes:
                raise ValueError(f"SEMISUP.TEACHER.CONFIG {ss.TEACHER.CONFIG} has "
                                 f"{guide.model.sem_seg_head.num_classes} classes, the student "
                                 f"{student.sem_seg_head.num_classes}")
        self.schedule = TeacherSchedule(teacher=self.teacher, guide=guide, mode=ss.MODE,
                                        burn_in_iters=ss.BURN_IN_ITERS, decay=ss.EMA_DECAY)
        return SemiSupervisedStep(
            model, data_loader, optimizer,
            unlabeled_loader=build_unlabeled_loader(cfg, self.run_seed), labeler=PseudoLabeler(cfg),
            schedule=self.schedule, unsup_weight=ss.UNSUP_LOSS_WEIGHT, unlabeled_period=ss.UNLABELED_PERIOD,
            empty_pseudo_labels=ss.EMPTY_PSEUDO_LABELS, amp=AmpSettings.from_config(cfg),
            clip=build_gradient_clipper(cfg),
        )

    def build_hooks(self):
        # Trainer.__init__ calls this last, once the checkpointer exists: the teacher is saved with the run.
        self.checkpointer.add_checkpointable("teacher", self.teacher)
        ret = super().build_hooks()
        for i, h in enumerate(ret):
            if isinstance(h, hooks.EvalHook):
                ret[i] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_and_save_results)
        # The teacher update runs after the optimizer step and before checkpointing and evaluation.
        at = next((i for i, h in enumerate(ret) if isinstance(h, (hooks.PreciseBN, hooks.PeriodicCheckpointer,
                                                                   hooks.EvalHook, hooks.PeriodicWriter))), len(ret))
        ret.insert(at, self.schedule)
        return ret

    def _load_guide(self):
        guide, path = self.schedule.guide, self.cfg.SEMISUP.TEACHER.WEIGHTS
        if guide is None:
            return
        logger.info(f"Loading the burn-in teacher from {path}")
        load_teacher_weights(guide.model, path, "SEMISUP.TEACHER.WEIGHTS")
        guide.model.eval()

    def resume_or_load(self, resume=True):
        # The burn-in teacher's weights first: a checkpoint of this run, when resuming, then replaces them.
        self._load_guide()
        super().resume_or_load(resume=resume)
        self.train_step.reset_unlabeled(seed=mix_seed(self.run_seed, self.cfg.SEMISUP.UNLABELED_SEED_OFFSET))

    def _test_and_save_results(self):
        self._last_eval_results = evaluate_student_teacher(type(self), self.cfg, self.model, self.teacher.model)
        return self._last_eval_results

    @classmethod
    def eval_only(cls, cfg, resume=False):
        """``--eval-only``: the student and / or the teacher of a checkpoint of this trainer (MODEL.WEIGHTS,
        or the last checkpoint of OUTPUT_DIR with ``resume``), as ``SEMISUP.EVAL_MODEL`` says."""
        which = _eval_model_choice(cfg)
        student = cls.build_model(cfg)
        teacher = FrozenTeacher(build_model(cfg))
        checkpointer = Checkpointer(student, save_dir=cfg.OUTPUT_DIR)
        # The student; the checkpoint's other entries are returned.
        if resume and checkpointer.has_checkpoint():
            path, rest = checkpointer.resume(checkpointables=[])
        elif cfg.MODEL.WEIGHTS:
            path, rest = cfg.MODEL.WEIGHTS, checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
        else:
            raise ValueError("--eval-only of SemiSupervisedTrainer needs MODEL.WEIGHTS (a checkpoint of the run) or "
                             "--resume")
        if "teacher" in rest:
            teacher.load_state_dict(rest["teacher"])
        elif which != "STUDENT":
            raise KeyError(f"{path} holds no 'teacher' (SEMISUP.EVAL_MODEL {which}): give a checkpoint written by "
                           "SemiSupervisedTrainer, or SEMISUP.EVAL_MODEL STUDENT")
        return evaluate_student_teacher(cls, cfg, student, teacher.model)
