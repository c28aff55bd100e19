"""Training and test data loaders.

The training stream is a pure function of (seed, position): the sample at global position ``p`` is
taken from a sample plan (``selftrain_d2.data.samplers``: by default a seeded permutation per epoch;
with pseudo labels, a mix of real and pseudo samples, optionally drawn by centroid sampling) and
augmented with NumPy / ``random`` seeded from (seed, p). A resumed run therefore sees exactly the
batches the uninterrupted run would have seen, and the same config gives the same batches whatever
the number of loader workers.
"""
import logging
import os
import random

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.utils import comm

from .centroids import CentroidIndex, build_centroid_index, load_centroid_index
from .crop_schedules import EpochTable
from .image_io import UnreadableImageError
from .mappers import build_mapper
from .samplers import MixedPlan, PermutationPlan, mix_seed, plan_stream

__all__ = [
    "SeededTrainStream", "TrainLoader", "build_train_loader", "build_test_loader", "build_sample_plan", "build_epoch_table", "mix_seed",
]

logger = logging.getLogger(__name__)


def permutation_stream(size, seed, shuffle, start=0):
    """Infinite ``(position, index)`` pairs: epoch ``e`` is a seeded permutation of ``range(size)``."""
    for position, entry in plan_stream(PermutationPlan(size, shuffle), seed, start):
        yield position, entry.index


class SeededTrainStream(torchdata.IterableDataset):
    """Yields per-rank batches (lists of mapped dicts) from a deterministic global sample stream.

    Global position ``p`` goes to rank ``p % world_size``; within a rank, consecutive chunks of
    ``batch_size`` samples go to loader workers in turn, so batch ``k`` of a rank is the same
    whatever ``num_workers`` is. Unreadable images are skipped (and logged) when ``skip_unreadable``.
    """

    def __init__(self, dataset, mapper, batch_size, *, seed, shuffle=True, rank=0, world_size=1,
                 skip_unreadable=True, aspect_ratio_grouping=False, plan=None, table=None):
        self.dataset = dataset
        # Which dataset entries (and crop centres) make up each epoch; see selftrain_d2.data.samplers.
        self.plan = plan if plan is not None else PermutationPlan(len(dataset), shuffle)
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.skip_unreadable = skip_unreadable
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.start = 0  # global sample position the next iterator starts from
        # A crop schedule (selftrain_d2.data.crop_schedules.EpochTable): iteration i's batch is the sample
        # positions table.batch_span(i), mapped at the crop of its epoch; batch_size and aspect-ratio
        # grouping (all crops of an epoch have one shape) are then unused.
        self.table = table
        self.start_iter = 0

    def set_start_iter(self, iteration, seed=None):
        """Start the next iterator at training iteration ``iteration`` (and optionally a new seed)."""
        self.start = iteration * self.batch_size * self.world_size
        self.start_iter = iteration
        if seed is not None:
            self.seed = seed

    def _rank_samples(self):
        for position, entry in plan_stream(self.plan, self.seed, self.start):
            if position % self.world_size == self.rank:
                yield position, entry

    def _worker_samples(self):
        info = torchdata.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, item in enumerate(self._rank_samples()):
            if (i // self.batch_size) % num_workers == worker:
                yield item

    def _map(self, position, entry, crop_size=None):
        state = mix_seed(self.seed, position)
        np.random.seed(state)
        random.seed(state)
        record = self.dataset[entry.index]
        if entry.center is not None:
            record = dict(record, crop_center=entry.center)
        if crop_size is not None:
            record = dict(record, crop_size=crop_size)
        try:
            return self.mapper(record)
        except UnreadableImageError as e:
            if not self.skip_unreadable:
                raise
            logger.warning(f"Skipping unreadable image (DATALOADER.SKIP_UNREADABLE): {e}")
            return None

    def _scheduled_batches(self):
        info = torchdata.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.table.batch_span(self.start_iter)[0]
        samples = plan_stream(self.plan, self.seed, start)
        iteration = self.start_iter
        while True:
            first, stop = self.table.batch_span(iteration)
            entries = [next(samples) for _ in range(stop - first)]
            if iteration % num_workers == worker:
                crop = self.table.at_iter(iteration).crop if iteration < self.table.max_iter else \
                    self.table.entries[-1].crop
                mapped = (self._map(p, e, crop) for p, e in entries if p % self.world_size == self.rank)
                batch = [m for m in mapped if m is not None]
                if batch:
                    yield batch
            iteration += 1

    def __iter__(self):
        if self.table is not None:
            yield from self._scheduled_batches()
            return
        buckets = [[], []]
        for position, entry in self._worker_samples():
            sample = self._map(position, entry)
            if sample is None:
                continue
            tall = self.aspect_ratio_grouping and sample["image"].shape[-2] > sample["image"].shape[-1]
            bucket = buckets[int(tall)]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


class TrainLoader(torchdata.DataLoader):
    """The DataLoader of a :class:`SeededTrainStream` (ready batches: no collation), and what a trainer asks of
    it: the records it draws from, the crop schedule's table, and where the next iterator starts."""

    def __init__(self, stream, num_workers, seed):
        if not isinstance(stream, SeededTrainStream):
            raise TypeError(f"TrainLoader needs a SeededTrainStream, got {type(stream).__name__}")
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, collate_fn=None, persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating an iterator must not draw from torch's global RNG, which
            # StepSeeder has just seeded for the step in which a resumed run creates it.
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def records(self):
        """The dataset dicts the stream draws from (real, then pseudo-labelled)."""
        return self.dataset.dataset

    @property
    def crop_table(self):
        """The crop schedule's :class:`EpochTable`, or None without INPUT.CROP_SCHEDULE."""
        return self.dataset.table

    def set_start_iter(self, iteration, seed=None):
        """The next iterator starts at training iteration ``iteration`` (with ``seed``, when given)."""
        self.dataset.set_start_iter(iteration, seed=seed)


def _per_rank_batch(total, world_size):
    if total % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by the {world_size} processes")
    return total // world_size


def _centroid_index(cfg, names, records, group, known):
    """The centroid index of datasets ``names`` (whose dicts, concatenated, are ``records``), aligned to
    ``records``: loaded from DATALOADER.CENTROID_SAMPLING.INDEX_FILES, or built here when none is given."""
    cs = cfg.DATALOADER.CENTROID_SAMPLING
    num_classes, ignore = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    files = _index_files(cfg, known)
    parts = []
    for name in names:
        if name in files:
            part = load_centroid_index(files[name], num_classes=num_classes)
            if part.min_area != cs.MIN_AREA:
                logger.warning(f"centroid index {files[name]} was built with MIN_AREA {part.min_area}, "
                               f"not DATALOADER.CENTROID_SAMPLING.MIN_AREA={cs.MIN_AREA}; using it as it is")
        else:
            logger.info(f"Building the centroid index of {name} in memory (a saved one can be given in "
                        "DATALOADER.CENTROID_SAMPLING.INDEX_FILES)")
            part = build_centroid_index(DatasetCatalog.get(name), num_classes, cs.MIN_AREA, ignore)
        parts.append(part)
    source = "the centroid index of " + ", ".join(f"{n} ({files.get(n, 'built in memory')})" for n in names)
    index = CentroidIndex.concatenate(parts).aligned_to(records, source=source, dataset=f"{group} {names}")
    if not len(index):
        raise ValueError(
            f"{source} holds no regions of >= {cs.MIN_AREA} pixels (DATALOADER.CENTROID_SAMPLING.MIN_AREA)"
        )
    return index


def _index_files(cfg, known):
    files = {}
    for entry in cfg.DATALOADER.CENTROID_SAMPLING.INDEX_FILES:
        if len(entry) != 2:
            raise ValueError(
                f"DATALOADER.CENTROID_SAMPLING.INDEX_FILES: expected [DATASET_NAME, FILE] pairs, got {entry!r}"
            )
        name, path = entry
        if name not in known:
            raise ValueError(f"DATALOADER.CENTROID_SAMPLING.INDEX_FILES names dataset {name!r}, which is not a training "
                             f"dataset (DATASETS.TRAIN / TRAIN_PSEUDO: {sorted(known)})")
        files[name] = os.path.expanduser(path)
    return files


def build_sample_plan(cfg, real_names, real_dicts, pseudo_names=(), pseudo_dicts=()):
    """The training stream's sample plan: a plain per-epoch permutation of the real dicts, or (with pseudo
    datasets, REAL_REPEAT > 1, REAL_FRACTION < 1 or centroid sampling) a ``MixedPlan`` over
    ``real_dicts + pseudo_dicts``."""
    dl, cs = cfg.DATALOADER, cfg.DATALOADER.CENTROID_SAMPLING
    if not real_dicts:
        raise ValueError("DATASETS.TRAIN has no images: the pseudo samples per epoch are counted per real sample "
                         "(DATALOADER.PSEUDO_RATIO); to train on pseudo labels alone, put them in DATASETS.TRAIN")
    if not 0 < dl.REAL_FRACTION <= 1:
        raise ValueError(f"DATALOADER.REAL_FRACTION must be in (0, 1] (the share of the real images drawn per epoch), "
                         f"got {dl.REAL_FRACTION}")
    if not (pseudo_names or dl.REAL_REPEAT > 1 or dl.REAL_FRACTION < 1 or cs.ENABLED):
        return PermutationPlan(len(real_dicts))
    if cs.APPLY_TO not in ("pseudo", "all"):
        raise ValueError(f"DATALOADER.CENTROID_SAMPLING.APPLY_TO must be 'pseudo' or 'all', got {cs.APPLY_TO!r}")
    real_index = pseudo_index = None
    known = set(real_names) | set(pseudo_names)
    if cs.ENABLED:
        if not cfg.INPUT.CROP.ENABLED:
            raise ValueError("DATALOADER.CENTROID_SAMPLING.ENABLED needs INPUT.CROP.ENABLED: it crops around centroids")
        if not 0 <= cs.JITTER < 0.5:
            raise ValueError(f"DATALOADER.CENTROID_SAMPLING.JITTER must be in [0, 0.5) (the centroid stays in the "
                             f"crop), got {cs.JITTER}")
        if cs.APPLY_TO == "all":
            real_index = _centroid_index(cfg, real_names, real_dicts, "DATASETS.TRAIN", known)
        if pseudo_names:
            pseudo_index = _centroid_index(cfg, pseudo_names, pseudo_dicts, "DATASETS.TRAIN_PSEUDO", known)
        elif cs.APPLY_TO == "pseudo":
            logger.warning("DATALOADER.CENTROID_SAMPLING.ENABLED with APPLY_TO 'pseudo' but no DATASETS.TRAIN_PSEUDO: "
                           "nothing is drawn by centroids")
    # Without pseudo datasets (the duplicate-real-labels baseline) the ratio has nothing to draw from.
    ratio = dl.PSEUDO_RATIO if pseudo_names else 0.0
    plan = MixedPlan(len(real_dicts), len(pseudo_dicts), pseudo_ratio=ratio, real_repeat=dl.REAL_REPEAT,
                     real_fraction=dl.REAL_FRACTION, real_centroids=real_index, pseudo_centroids=pseudo_index)
    share = f" x fraction {dl.REAL_FRACTION}" if dl.REAL_FRACTION < 1 else ""
    logger.info(
        f"Training epoch: {plan.num_real_samples} real samples ({len(real_dicts)} images{share} x {dl.REAL_REPEAT}"
        f"{', centroid sampling' if real_index is not None else ''}) + {plan.num_pseudo_samples} pseudo samples "
        f"(from {len(pseudo_dicts)} images{', centroid sampling' if pseudo_index is not None else ''})"
    )
    return plan


def build_epoch_table(cfg, epoch_size, world_size=1):
    """The crop schedule's per-epoch table (INPUT.CROP_SCHEDULE), or None when it is off. The number of
    epochs is INPUT.CROP_SCHEDULE.EPOCHS, or as many as SOLVER.MAX_ITER x IMS_PER_BATCH images make, so a
    schedule processes the images a constant-crop run of that config would."""
    cs = cfg.INPUT.CROP_SCHEDULE
    if not cs.ENABLED:
        return None
    if not cfg.INPUT.CROP.ENABLED or cfg.INPUT.CROP.TYPE != "absolute":
        raise ValueError("INPUT.CROP_SCHEDULE needs INPUT.CROP.ENABLED with TYPE 'absolute' (its SIZE is the largest "
                         f"crop), got ENABLED={cfg.INPUT.CROP.ENABLED} TYPE={cfg.INPUT.CROP.TYPE!r}")
    epochs = cs.EPOCHS or max(1, round(cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH / epoch_size))
    table = EpochTable(
        schedule=cs.NAME, scales=cs.SCALES, full_crop=tuple(cfg.INPUT.CROP.SIZE), full_batch=cfg.SOLVER.IMS_PER_BATCH,
        max_batch=cs.MAX_BATCH, epoch_size=epoch_size, num_epochs=epochs, period=cs.PERIOD,
        warmup_epochs=cs.WARMUP_EPOCHS, lr_rule=cs.LR_SCALING, multiple=world_size,
        size_divisibility=cs.SIZE_DIVISIBILITY,
    )
    logger.info(f"Crop schedule {cs.NAME} (warm-up {cs.WARMUP_EPOCHS} epochs): {epochs} epochs of "
                f"{table.epoch_size} samples in {table.max_iter} iterations; crops/batches per epoch: "
                + ", ".join(f"{e.crop[0]}x{e.crop[1]}/{e.batch}" for e in table.entries[:12])
                + (" ..." if len(table.entries) > 12 else ""))
    return table


def _check_soft_label_model(cfg, mapper):
    """DATASETS.TRAIN_PSEUDO_SOFT needs a mapper that reads soft labels and a model that trains on them."""
    from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    soft = f"DATASETS.TRAIN_PSEUDO_SOFT {tuple(cfg.DATASETS.TRAIN_PSEUDO_SOFT)} trains on soft labels"
    if not getattr(mapper, "supports_soft_labels", False):
        raise ValueError(f"{soft}, but the mapper {type(mapper).__name__} (INPUT.DATASET_MAPPER_NAME) does not read "
                         "them; use the 'semantic' mapper")
    arch = cfg.MODEL.META_ARCHITECTURE
    takes = arch in META_ARCH_REGISTRY and getattr(META_ARCH_REGISTRY.get(arch), "accepts_soft_labels", False)
    if not takes:
        raise ValueError(f"{soft}, but MODEL.META_ARCHITECTURE {arch!r} does not take them: use SoftSemanticSegmentor "
                         "(Detectron2's SemanticSegmentor with the same weights), PSPNet or FastSCNN")
    head = cfg.MODEL.SEM_SEG_HEAD.NAME
    if arch == "SoftSemanticSegmentor" and not getattr(SEM_SEG_HEADS_REGISTRY.get(head), "accepts_soft_labels", False):
        raise ValueError(f"{soft}, but MODEL.SEM_SEG_HEAD.NAME {head!r} does not train on them: use "
                         "DeepLabV3PlusGlobalPoolHead")


def _pseudo_dicts(cfg, pseudo_names, filter_empty):
    """The pseudo-labelled datasets' dicts; those of DATASETS.TRAIN_PSEUDO_SOFT marked ``use_soft_label``."""
    soft_names = list(cfg.DATASETS.TRAIN_PSEUDO_SOFT)
    unknown = [n for n in soft_names if n not in pseudo_names]
    if unknown:
        raise ValueError(f"DATASETS.TRAIN_PSEUDO_SOFT names {unknown}, which are not in DATASETS.TRAIN_PSEUDO "
                         f"{tuple(pseudo_names)}")
    dicts = []
    for name in pseudo_names:
        part = get_detection_dataset_dicts([name], filter_empty=filter_empty)
        if name in soft_names:
            missing = [d["file_name"] for d in part if "soft_label_file_name" not in d]
            if missing:
                raise ValueError(f"DATASETS.TRAIN_PSEUDO_SOFT: dataset {name!r} has no soft labels for {len(missing)} "
                                 f"images (e.g. {missing[0]}); write them with OFFLINE_PSEUDO_LABELS.FORMAT soft")
            part = [dict(d, use_soft_label=True) for d in part]
        dicts.extend(part)
    return dicts


def build_train_loader(cfg, mapper=None, dataset_names=None, seed=None):
    """A DataLoader of per-rank training batches from ``cfg.DATASETS.TRAIN`` (or ``dataset_names``), plus
    the pseudo-labelled ``cfg.DATASETS.TRAIN_PSEUDO`` mixed in per ``build_sample_plan`` (those of
    ``DATASETS.TRAIN_PSEUDO_SOFT`` with their soft labels)."""
    names = list(dataset_names or cfg.DATASETS.TRAIN)
    pseudo_names = list(cfg.DATASETS.TRAIN_PSEUDO)
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    dicts = get_detection_dataset_dicts(names, filter_empty=filter_empty) if names else []
    pseudo = _pseudo_dicts(cfg, pseudo_names, filter_empty) if pseudo_names else []
    plan = build_sample_plan(cfg, names, dicts, pseudo_names, pseudo)
    mapper = mapper if mapper is not None else build_mapper(cfg, is_train=True)
    if cfg.DATASETS.TRAIN_PSEUDO_SOFT:
        _check_soft_label_model(cfg, mapper)
    if cfg.DATALOADER.CENTROID_SAMPLING.ENABLED and not getattr(mapper, "supports_crop_center", False):
        logger.warning(f"DATALOADER.CENTROID_SAMPLING.ENABLED, but the mapper {type(mapper).__name__} ignores crop "
                       "centres: samples are drawn by centroid, but not cropped around it")
    world = comm.get_world_size()
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    table = build_epoch_table(cfg, plan.epoch_size, world)
    if table is not None and not getattr(mapper, "supports_crop_size", False):
        raise ValueError(f"INPUT.CROP_SCHEDULE.ENABLED, but the mapper {type(mapper).__name__} cannot change its crop "
                         "per sample (it needs supports_crop_size and a record 'crop_size')")
    stream = SeededTrainStream(
        dicts + pseudo, mapper, _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, world), seed=seed,
        rank=comm.get_rank(), world_size=world, skip_unreadable=cfg.DATALOADER.SKIP_UNREADABLE,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING and table is None, plan=plan, table=table,
    )
    return TrainLoader(stream, cfg.DATALOADER.NUM_WORKERS, seed)


def build_test_loader(cfg, dataset_name, mapper=None):
    """Detectron2's inference loader (one image per batch, every image once) with our mapper."""
    mapper = mapper if mapper is not None else build_mapper(cfg, is_train=False)
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
