"""The Trainer every selftrain-d2 command builds on: Detectron2's DefaultTrainer, with

- the registered mappers and the seeded, resumable training stream (selftrain_d2.data.build),
- DDP that also works for CPU processes (gloo),
- one train step (TrainStep) for full and mixed precision on any device, with gradient clipping after
  the GradScaler's unscale_,
- the one shared ``build_evaluator``,
- DeepLab's poly learning-rate schedule when asked for by name, and the Mask2Former optimizer
  recipe (AdamW, backbone multiplier, embedding weight decay, full-model clipping) by config,
- per-step seeding, so ``--resume`` repeats the uninterrupted run exactly.
"""
import logging
import os
import weakref

from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..data.build import TrainLoader, build_test_loader, build_train_loader
from ..evaluation import build_evaluator
from ..evaluation.label_statistics import log_training_set
from ..modeling import apply_memory_format
from ..solver import build_gradient_clipper, build_lr_scheduler, build_optimizer
from ..utils.io import atomic_write_json
from .checkpoint import build_checkpointer
from .ddp import wrap_ddp
from .hooks import CropScheduleHook, StepSeeder
from .train_step import AmpSettings, TrainStep

__all__ = ["Trainer", "write_results"]


def write_results(output_dir, results, name="final_metrics.json"):
    """Save evaluator results (nested dict of floats) as JSON, from the main process only."""
    if comm.is_main_process() and output_dir and results:
        atomic_write_json(os.path.join(output_dir, name), results, indent=2, sort_keys=True)


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer (its hooks, ``train``, ``test``, checkpoint resume) built by our own
    constructor: DefaultTrainer's wraps DDP with Detectron2's ``create_ddp_model``, whose ``device_ids``
    CPU processes reject, and builds a SimpleTrainer / AMPTrainer that :meth:`build_train_step` replaces.
    Each part comes from an overridable builder (``build_model``, ``build_optimizer``, ``build_train_loader``,
    ``build_train_step``, ``build_lr_scheduler``, ``build_hooks``), and the attributes DefaultTrainer's
    methods read are the same."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.run_seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        seed_all_rng(self.run_seed)  # the same config builds the same initial weights

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg, seed=self.run_seed)
        # A loader of another kind (an overridden build_train_loader) has no crop schedule and no records to log.
        ours = isinstance(data_loader, TrainLoader)
        if ours and comm.is_main_process():
            log_training_set(cfg, data_loader.records)  # size and class shares: a class without labels shows here
        # A crop-size schedule fixes the iteration count: the images of the constant schedule, in
        # batches that grow as the crop shrinks.
        self.crop_table = data_loader.crop_table if ours else None
        if self.crop_table is not None and self.crop_table.max_iter != cfg.SOLVER.MAX_ITER:
            logging.getLogger(__name__).info(
                f"INPUT.CROP_SCHEDULE: SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} -> {self.crop_table.max_iter}")
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.MAX_ITER = self.crop_table.max_iter
            cfg.freeze()
        model = wrap_ddp(model, broadcast_buffers=False)
        self._trainer = self.build_train_step(cfg, model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer, table=self.crop_table)
        # MODEL.CLASS_TRANSFER: class rows remapped by name when starting from other classes' weights.
        self.checkpointer = build_checkpointer(cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_train_step(self, cfg, model, data_loader, optimizer):
        """What runs one iteration (Detectron2's ``_trainer``; :attr:`train_step`): a :class:`TrainStep` (AMP,
        clipping, skipped non-finite steps). A trainer that trains differently overrides this builder; it is
        called once the model (DDP-wrapped), optimizer and loader exist, before the scheduler, the checkpointer
        and the hooks."""
        return TrainStep(model, data_loader, optimizer, amp=AmpSettings.from_config(cfg),
                         clip=build_gradient_clipper(cfg))

    @property
    def train_step(self):
        """The step :meth:`build_train_step` built (hooks adjust its settings through this)."""
        return self._trainer

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.SELFTRAIN.DETERMINISTIC_STEPS:
            hooks.insert(0, StepSeeder(self.run_seed))
        if self.crop_table is not None:
            hooks.insert(0, CropScheduleHook(self.crop_table))
        return hooks

    def resume_or_load(self, resume=True):
        if resume:
            self.checkpointer.remove_interrupted_saves()
        super().resume_or_load(resume=resume)
        if resume and self.start_iter >= self.max_iter:
            # Nothing is left to train, so no hook writes the final checkpoint again: one whose write was
            # killed (or that was removed) is written from the restored state, which is the final state.
            self.checkpointer.ensure_loadable("model_final", iteration=self.iter)
        # The checkpoint may carry the run seed (StepSeeder state): the data stream follows it.
        seeder = next((h for h in self._hooks if isinstance(h, StepSeeder)), None)
        if seeder is not None:
            self.run_seed = seeder.seed
        if isinstance(self.data_loader, TrainLoader):
            self.data_loader.set_start_iter(self.start_iter, seed=self.run_seed)

    def train(self):
        super().train()
        results = getattr(self, "_last_eval_results", None)
        write_results(self.cfg.OUTPUT_DIR, results)
        return results

    @classmethod
    def build_model(cls, cfg):
        # DefaultTrainer's (it logs the model), then MODEL.CHANNELS_LAST's layout.
        return apply_memory_format(super().build_model(cfg), cfg)

    @classmethod
    def build_train_loader(cls, cfg, seed=None):
        return build_train_loader(cfg, seed=seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer, table=None):
        return build_lr_scheduler(cfg, optimizer, table=table)
