"""Training and test data loaders.

The training stream is a pure function of (seed, position): the sample at global position ``p`` is
drawn from a seeded permutation and augmented with NumPy / ``random`` seeded from (seed, p). A
resumed run therefore sees exactly the batches the uninterrupted run would have seen, and the
same config gives the same batches whatever the number of loader workers.
"""
import logging
import random

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.utils import comm

from .image_io import UnreadableImageError
from .mappers import build_mapper

__all__ = ["SeededTrainStream", "build_train_loader", "build_test_loader", "mix_seed"]

logger = logging.getLogger(__name__)


def mix_seed(*values):
    """A 32-bit seed derived from integers (stable across processes, unlike ``hash``)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def permutation_stream(size, seed, shuffle, start=0):
    """Infinite ``(position, index)`` pairs: epoch ``e`` is a seeded permutation of ``range(size)``."""
    epoch, offset = divmod(start, size)
    position = start
    while True:
        order = np.random.default_rng(mix_seed(seed, epoch)).permutation(size) if shuffle else np.arange(size)
        for index in order[offset:]:
            yield position, int(index)
            position += 1
        epoch, offset = epoch + 1, 0


class SeededTrainStream(torchdata.IterableDataset):
    """Yields per-rank batches (lists of mapped dicts) from a deterministic global sample stream.

    Global position ``p`` goes to rank ``p % world_size``; within a rank, consecutive chunks of
    ``batch_size`` samples go to loader workers in turn, so batch ``k`` of a rank is the same
    whatever ``num_workers`` is. Unreadable images are skipped (and logged) when ``skip_unreadable``.
    """

    def __init__(self, dataset, mapper, batch_size, *, seed, shuffle=True, rank=0, world_size=1,
                 skip_unreadable=True, aspect_ratio_grouping=False):
        self.dataset = dataset
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.skip_unreadable = skip_unreadable
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.start = 0  # global sample position the next iterator starts from

    def set_start_iter(self, iteration, seed=None):
        """Start the next iterator at training iteration ``iteration`` (and optionally a new seed)."""
        self.start = iteration * self.batch_size * self.world_size
        if seed is not None:
            self.seed = seed

    def _rank_samples(self):
        stream = permutation_stream(len(self.dataset), self.seed, self.shuffle, self.start)
        for position, index in stream:
            if position % self.world_size == self.rank:
                yield position, index

    def _worker_samples(self):
        info = torchdata.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, item in enumerate(self._rank_samples()):
            if (i // self.batch_size) % num_workers == worker:
                yield item

    def _map(self, position, index):
        state = mix_seed(self.seed, position)
        np.random.seed(state)
        random.seed(state)
        record = self.dataset[index]
        try:
            return self.mapper(record)
        except UnreadableImageError as e:
            if not self.skip_unreadable:
                raise
            logger.warning(f"Skipping unreadable image (DATALOADER.SKIP_UNREADABLE): {e}")
            return None

    def __iter__(self):
        buckets = [[], []]
        for position, index in self._worker_samples():
            sample = self._map(position, index)
            if sample is None:
                continue
            tall = self.aspect_ratio_grouping and sample["image"].shape[-2] > sample["image"].shape[-1]
            bucket = buckets[int(tall)]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


def _per_rank_batch(total, world_size):
    if total % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by the {world_size} processes")
    return total // world_size


def build_train_loader(cfg, mapper=None, dataset_names=None, seed=None):
    """A DataLoader of per-rank training batches from ``cfg.DATASETS.TRAIN`` (or ``dataset_names``)."""
    names = list(dataset_names or cfg.DATASETS.TRAIN)
    dicts = get_detection_dataset_dicts(names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    mapper = mapper if mapper is not None else build_mapper(cfg, is_train=True)
    world = comm.get_world_size()
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    stream = SeededTrainStream(
        dicts, mapper, _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, world), seed=seed,
        rank=comm.get_rank(), world_size=world, skip_unreadable=cfg.DATALOADER.SKIP_UNREADABLE,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
    )
    return torchdata.DataLoader(
        stream, batch_size=None, num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=None, persistent_workers=False, pin_memory=torch.cuda.is_available(),
        # Its own generator: creating an iterator must not draw from torch's global RNG, which
        # StepSeeder has just seeded for the step in which a resumed run creates it.
        generator=torch.Generator().manual_seed(seed),
    )


def build_test_loader(cfg, dataset_name, mapper=None):
    """Detectron2's inference loader (one image per batch, every image once) with our mapper."""
    mapper = mapper if mapper is not None else build_mapper(cfg, is_train=False)
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
