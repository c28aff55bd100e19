"""Offline pseudo labelling: a teacher labels a registered dataset or an image folder, sharded and resumable.

Output folder layout::

    meta.json            task, classes, ignore label, the settings used and the teacher (written first;
                         a resumed run must use the same settings)
    labels/KEY.png       semantic hard labels (train ids, ignore where the confidence is under the threshold)
    confidence/KEY.png   top class probability as round(p * 255) (OFFLINE_PSEUDO_LABELS.SAVE_CONFIDENCE)
    soft/KEY.npz         top-k class probabilities (OFFLINE_PSEUDO_LABELS.FORMAT "soft")
    instances/KEY.json   instance predictions of one image (COCO annotations with RLE masks and scores)
    progress/rankR.jsonl one line per finished image, appended by rank R in batches (see below)
    report.json          images, written, already_done, skipped [{file, error}], seconds (of the whole call),
                         images_per_s (images written / seconds spent labelling, slowest rank)
    dataset.json         Detectron2 dataset dicts of the labelled images (registered by DATASETS.PSEUDO_LABEL_FOLDERS)
    instances.json       COCO-format predictions of all images (instance task)

KEY is :func:`selftrain_d2.data.records.image_key` of the input record. Each rank takes the inputs whose index
``% world_size == rank``; an image counts as finished once it is in a progress file and its files exist.

While the teacher labels an image, background threads (``max(1, DATALOADER.NUM_WORKERS)`` of each kind) read
and resize the next ones and write the finished ones' files. Labels are made on the teacher's device; only
uint8 / float16 arrays (instance masks already thresholded) come to the host. Each file is written to a
temporary name, fsync'ed and renamed, so it is complete or absent; progress lines are appended in batches
(every ``PROGRESS_BATCH`` images or ``PROGRESS_SECONDS``), after an fsync of the folders that hold the batch's
files, and fsync'ed. A killed run so redoes at most the images of the last unrecorded batch and those in
flight, and a rerun writes nothing.
"""
import functools
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..data.image_io import UnreadableImageError, read_image
from ..data.records import image_key
from ..teacher.frozen import build_frozen_teacher
from ..teacher.probabilities import SCORE_KINDS, scores_to_probabilities
from ..utils.io import atomic_write_json, fsync_dir, remove_temporaries
from . import class_balance, storage
from .folder import PseudoLabelFolder, load_pseudo_label_dataset, register_pseudo_label_dataset  # noqa: F401
from .tta import multi_scale_flip, sliding_window

__all__ = [
    "generate_pseudo_labels", "register_teacher_output", "teacher_output", "scores_to_probabilities",
    "load_input_records", "register_pseudo_label_dataset", "load_pseudo_label_dataset",
]

logger = logging.getLogger(__name__)

# Progress lines are committed (folders fsync'ed, lines appended and fsync'ed) every this many images, or this
# many seconds after the oldest uncommitted one, whichever comes first.
PROGRESS_BATCH = 64
PROGRESS_SECONDS = 10.0

# meta-architecture -> (task, what its per-pixel "sem_seg" output holds: "logits" or non-negative "scores").
_TEACHER_OUTPUTS = {
    "SemanticSegmentor": ("semantic", "logits"),
    "Mask2FormerSemantic": ("semantic", "scores"),
    "Mask2FormerInstance": ("instance", None),
}


def register_teacher_output(meta_architecture, task, scores=None):
    """Declare how a meta-architecture's predictions become pseudo labels.

    ``task`` "semantic" (its output's ``sem_seg`` [C, H, W] holds ``scores``: "logits", turned into
    probabilities with a softmax, or non-negative "scores", normalised over classes) or "instance" (its
    output's ``instances``).
    """
    if task not in ("semantic", "instance"):
        raise ValueError(f"teacher task must be 'semantic' or 'instance', got {task!r}")
    if task == "semantic" and scores not in SCORE_KINDS:
        raise ValueError(f"semantic teacher {meta_architecture!r}: scores must be one of {SCORE_KINDS}, got {scores!r}")
    _TEACHER_OUTPUTS[meta_architecture] = (task, scores if task == "semantic" else None)


def teacher_output(cfg):
    """``(task, scores)`` of the teacher ``cfg.MODEL.META_ARCHITECTURE`` (see :func:`register_teacher_output`)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "MaskFormer":  # the generic meta-arch does what MODEL.MASK_FORMER.TEST asks
        if cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON:
            return "semantic", "scores"
        if cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON:
            return "instance", None
        raise ValueError(
            "MODEL.META_ARCHITECTURE MaskFormer with neither MODEL.MASK_FORMER.TEST.SEMANTIC_ON nor INSTANCE_ON "
            "gives no output to pseudo-label from"
        )
    if arch not in _TEACHER_OUTPUTS:
        known = ", ".join(sorted(list(_TEACHER_OUTPUTS) + ["MaskFormer"]))
        raise ValueError(
            f"MODEL.META_ARCHITECTURE {arch!r}: unknown how its predictions become pseudo labels (known: {known}); "
            "declare it with selftrain_d2.pseudo_labels.register_teacher_output"
        )
    return _TEACHER_OUTPUTS[arch]


# ---------------------------------------------------------------------------------------------------- input

def load_input_records(source):
    """``(records, metadata or None)``: a folder's images, or a registered dataset's dicts and metadata."""
    from ..data.datasets.image_folder import load_image_folder

    source = os.fspath(source)
    if os.path.isdir(os.path.expanduser(source)):
        folder = os.path.abspath(os.path.expanduser(source))
        return load_image_folder(folder), None
    if source in DatasetCatalog.list():
        return DatasetCatalog.get(source), MetadataCatalog.get(source)
    raise FileNotFoundError(
        f"pseudo-label input {source!r} is neither an image folder nor a registered dataset "
        "(register datasets with DATASETS.IMAGE_FOLDERS / DATASETS.SPLITS, or pass an existing folder)"
    )


def _keyed(records, source):
    keyed, seen = [], {}
    for record in records:
        key = image_key(record)
        parts = key.replace("\\", "/").split("/")
        if not key or os.path.isabs(key) or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"input {source}: image {record['file_name']} has key {key!r}, unusable as a file name")
        if key in seen:
            raise ValueError(
                f"input {source}: images {seen[key]} and {record['file_name']} share the key {key!r}; "
                "pseudo-label file names would clash"
            )
        seen[key] = record["file_name"]
        keyed.append((key, record))
    return keyed


def _classes(task, source_meta, cfg):
    """Class names (and the dataset-id mapping for instances) from the input's metadata, else the teacher's
    training data; numbered names when neither has them."""
    field = "stuff_classes" if task == "semantic" else "thing_classes"
    teacher = [MetadataCatalog.get(n) for n in cfg.DATASETS.TRAIN if n in DatasetCatalog.list()]
    candidates = [source_meta] + teacher
    if task == "semantic":
        # Semantic labels are ids of the teacher's classes: when the input's class list has another length
        # (a target domain with new classes), the teacher's training classes name them.
        num = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        candidates = [m for m in candidates if m is not None and len(m.get(field, None) or ()) == num]
    for meta in candidates:
        if meta is not None and meta.get(field, None):
            return meta, list(meta.get(field))
    num = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    logger.warning("No %s in the input's or the teacher's training metadata: naming %d classes by number", field, num)
    return None, [str(i) for i in range(num)]


# ---------------------------------------------------------------------------------------------------- progress

def _remove_interrupted_writes(root):
    """Remove the temporary files that writes interrupted by a kill left in ``root`` and its subfolders."""
    removed = []
    for folder, _, _ in os.walk(root):
        removed += remove_temporaries(folder)
    return removed


def _read_progress(root):
    """key -> {"height", "width"} of every image recorded by any rank (complete lines only)."""
    done = {}
    folder = os.path.join(root, "progress")
    if not os.path.isdir(folder):
        return done
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), "r") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue  # cut short by a kill
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                done[entry["key"]] = {"height": entry["height"], "width": entry["width"]}
    return done


class _ProgressLog:
    """Append-only record of finished images, written and fsync'ed a batch of lines at a time."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._f = open(path, "a+")
        self._f.seek(0, os.SEEK_END)
        if self._f.tell() > 0:
            self._f.seek(self._f.tell() - 1)
            if self._f.read(1) != "\n":  # a line cut short by a kill: end it so the next one stands alone
                self._f.write("\n")

    def add(self, entries):
        """Append ``(key, height, width)`` entries and fsync the file."""
        self._f.write("".join(json.dumps({"key": k, "height": int(h), "width": int(w)}) + "\n" for k, h, w in entries))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        self._f.close()


class _Prefetcher:
    """Reads and resizes the images of ``items`` (``(key, record)``) in background threads, a few ahead of the
    teacher; iterating yields ``(key, record, (image tensor, (height, width)) or UnreadableImageError)`` in order."""

    def __init__(self, items, cfg, threads):
        self._items = iter(items)
        self._cfg = cfg
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pseudo-label-reader")
        self._ahead = deque()
        for _ in range(2 * threads):
            self._submit_next()

    def _submit_next(self):
        item = next(self._items, None)
        if item is not None:
            self._ahead.append((*item, self._pool.submit(self._read, item[1])))

    def _read(self, record):
        try:
            image = read_image(record["file_name"], self._cfg.INPUT.FORMAT)
        except UnreadableImageError as e:
            return e
        return _model_input(image, self._cfg), image.shape[:2]

    def __iter__(self):
        while self._ahead:
            key, record, future = self._ahead.popleft()
            self._submit_next()
            yield key, record, future.result()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """Writes each image's files in background threads and records it in ``log`` once they exist: every
    PROGRESS_BATCH images (or PROGRESS_SECONDS) the folders of the batch's files are fsync'ed, then its progress
    lines appended and fsync'ed. A failed write stops further writes; :meth:`close` re-raises it."""

    def __init__(self, log, threads):
        self._log = log
        self._jobs = queue.Queue(maxsize=2 * threads)
        self._lock = threading.Lock()
        self._pending, self._folders = [], set()
        self._oldest = None
        self._error = None
        self._threads = [threading.Thread(target=self._run, name=f"pseudo-label-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key, height, width, write):
        """Queue ``write()`` (returns the paths it wrote) for image ``key``; raises an earlier write's error."""
        if self._error is not None:
            raise self._error
        self._jobs.put((key, height, width, write))

    def _run(self):
        while True:
            try:
                job = self._jobs.get(timeout=min(1.0, PROGRESS_SECONDS))
            except queue.Empty:
                job = ()
            if job is None:
                return
            if self._error is not None:
                continue  # drain the queue so that submit() never blocks on a failed writer
            try:
                if job:
                    key, height, width, write = job
                    paths = write()
                    with self._lock:
                        self._pending.append((key, height, width))
                        self._folders.update(os.path.dirname(p) for p in paths)
                        self._oldest = self._oldest or time.monotonic()
                self._commit(due_only=True)
            except BaseException as e:  # re-raised by the main thread (a KeyboardInterrupt too)
                with self._lock:
                    self._error = self._error or e

    def _commit(self, due_only=False):
        with self._lock:
            if not self._pending or (due_only and len(self._pending) < PROGRESS_BATCH
                                     and time.monotonic() - self._oldest < PROGRESS_SECONDS):
                return
            for folder in sorted(self._folders):
                fsync_dir(folder)
            self._log.add(self._pending)
            self._pending, self._folders, self._oldest = [], set(), None

    def close(self, reraise=True):
        """Finish the queued writes, record them, stop the threads; re-raise a write's error if ``reraise``."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        try:
            self._commit()
        except Exception:
            if reraise:
                raise
            logger.exception("Could not record the last pseudo-labelled images in %s", self._log.path)
        if reraise and self._error is not None:
            raise self._error


def _check_settings(root, meta):
    """meta.json of an earlier run must have been written with the same settings and source; returns it (or
    None)."""
    path = os.path.join(root, PseudoLabelFolder.META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        previous = json.load(f)
    for field in ("task", "settings", "source", "teacher_weights", "teacher_meta_architecture"):
        if previous.get(field) != meta.get(field):
            raise ValueError(
                f"{path}: this folder holds pseudo labels made with {field} = {previous.get(field)!r}, but this run "
                f"asks for {meta.get(field)!r}; use another --output folder or delete this one"
            )
    return previous


# ---------------------------------------------------------------------------------------------------- labelling

def _settings(cfg, task):
    pl = cfg.OFFLINE_PSEUDO_LABELS
    if pl.FORMAT not in ("hard", "soft"):
        raise ValueError(f"OFFLINE_PSEUDO_LABELS.FORMAT must be 'hard' or 'soft', got {pl.FORMAT!r}")
    if not 0.0 <= pl.THRESHOLD <= 1.0:
        raise ValueError(f"OFFLINE_PSEUDO_LABELS.THRESHOLD must lie in [0, 1], got {pl.THRESHOLD}")
    if pl.SOFT_TOP_K < 1:
        raise ValueError(f"OFFLINE_PSEUDO_LABELS.SOFT_TOP_K must be >= 1, got {pl.SOFT_TOP_K}")
    scales = [float(s) for s in pl.TTA.SCALES]
    if not scales or min(scales) <= 0:
        raise ValueError(f"OFFLINE_PSEUDO_LABELS.TTA.SCALES must be a non-empty list of positive scales, got {pl.TTA.SCALES}")
    sw = pl.SLIDING_WINDOW
    if sw.ENABLED and (len(sw.SIZE) != 2 or len(sw.STRIDE) != 2 or min(list(sw.SIZE) + list(sw.STRIDE)) < 1
                       or any(st > si for st, si in zip(sw.STRIDE, sw.SIZE))):
        raise ValueError(
            f"OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW.SIZE {list(sw.SIZE)} and STRIDE {list(sw.STRIDE)} must be (height, width) "
            "pairs of positive sizes, each stride at most the window size"
        )
    cb = pl.CLASS_BALANCE
    if task == "instance" and (scales != [1.0] or pl.TTA.FLIP or sw.ENABLED or cb.ENABLED):
        raise ValueError(
            "OFFLINE_PSEUDO_LABELS.TTA, OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW and OFFLINE_PSEUDO_LABELS.CLASS_BALANCE apply to semantic "
            f"teachers only; {cfg.MODEL.META_ARCHITECTURE} predicts instances"
        )
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if cb.ENABLED and (cb.SAMPLE_IMAGES < 1 or cb.SAMPLE_PIXELS < 1
                       or (len(cb.SHARES) and (len(cb.SHARES) != num_classes or min(cb.SHARES) < 0))):
        raise ValueError(
            f"OFFLINE_PSEUDO_LABELS.CLASS_BALANCE: SAMPLE_IMAGES ({cb.SAMPLE_IMAGES}) and SAMPLE_PIXELS ({cb.SAMPLE_PIXELS}) "
            f"must be positive and SHARES empty or {num_classes} non-negative numbers, got {list(cb.SHARES)}"
        )
    settings = {"task": task, "format": pl.FORMAT, "save_confidence": bool(pl.SAVE_CONFIDENCE)}
    if task == "semantic":
        settings.update(
            threshold=float(pl.THRESHOLD), soft_top_k=int(pl.SOFT_TOP_K), tta_scales=scales, tta_flip=bool(pl.TTA.FLIP),
            sliding_window=[list(sw.SIZE), list(sw.STRIDE)] if sw.ENABLED else None,
            test_size=[cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
        )
        if cb.ENABLED:  # the key only when on: folders written before it existed keep their settings
            settings["class_balance"] = {
                "shares": [float(v) for v in cb.SHARES] or {"labels_of": list(cfg.DATASETS.TRAIN)},
                "sample_images": int(cb.SAMPLE_IMAGES), "sample_pixels": int(cb.SAMPLE_PIXELS),
            }
    else:
        settings.update(format="coco", save_confidence=False,
                        instance_score_threshold=float(pl.INSTANCE_SCORE_THRESHOLD))
    return settings


def _model_input(image, cfg):
    """CHW uint8 tensor of ``image`` resized as the test mapper does (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)."""
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _model_device(model, cfg):
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device(cfg.MODEL.DEVICE)


def semantic_probabilities(model, image, out_size, cfg, scores):
    """float32 ``[C, H, W]`` class probabilities of ``image`` (CHW tensor, as :func:`_model_input` makes it) at
    ``out_size`` (the original image's height and width), with the configured TTA, on the teacher's device."""
    def predict(x):
        out = model([{"image": x, "height": x.shape[-2], "width": x.shape[-1]}])[0]["sem_seg"]
        return scores_to_probabilities(out, scores)

    sw = cfg.OFFLINE_PSEUDO_LABELS.SLIDING_WINDOW
    # Padding with the pixel mean becomes 0 after the model's normalisation, like Detectron2's batch padding.
    pad = list(cfg.MODEL.PIXEL_MEAN)
    run = (lambda x: sliding_window(predict, x, sw.SIZE, sw.STRIDE, pad)) if sw.ENABLED else predict
    tta = cfg.OFFLINE_PSEUDO_LABELS.TTA
    return multi_scale_flip(run, image, tta.SCALES, tta.FLIP, out_size=out_size)


def instance_predictions(model, image, height, width, score_threshold):
    """The teacher's instances scoring at least ``score_threshold``, best first, as host arrays: ``masks``
    uint8 [N, height, width] (thresholded at 0.5 on the device), ``scores`` float32, ``classes`` (contiguous)."""
    instances = model([{"image": image, "height": height, "width": width}])[0]["instances"]
    scores = instances.scores.float()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[scores[keep].argsort(descending=True, stable=True)]
    return {
        "masks": (instances.pred_masks[keep] > 0.5).to(torch.uint8).cpu().numpy(),
        "scores": scores[keep].cpu().numpy(),
        "classes": instances.pred_classes[keep].cpu().numpy(),
    }


def instance_annotations(prediction, height, width, contiguous_to_dataset_id):
    """COCO annotations (RLE masks, dataset category ids, scores) of :func:`instance_predictions`' output."""
    from pycocotools import mask as mask_util

    if len(prediction["scores"]) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(prediction["masks"].transpose(1, 2, 0)))
    boxes, areas = mask_util.toBbox(rles), mask_util.area(rles)
    annotations = []
    for i, (score, contiguous) in enumerate(zip(prediction["scores"].tolist(), prediction["classes"].tolist())):
        annotations.append({
            "category_id": int(contiguous_to_dataset_id.get(contiguous, contiguous)),
            "segmentation": {"size": [height, width], "counts": rles[i]["counts"].decode("ascii")},
            "score": float(score),
            "bbox": [float(v) for v in boxes[i]],
            "area": float(areas[i]),
            "iscrowd": 0,
        })
    return annotations


def _write_semantic(files, arrays, num_classes):
    """Write one image's semantic label files (the folder fsync is left to the batch); returns their paths."""
    if "soft" in files:
        storage.write_top_k(files["soft"], arrays["soft_indices"], arrays["soft_probs"], num_classes, sync_dir=False)
    if "confidence" in files:
        storage.write_confidence(files["confidence"], arrays["confidence"], sync_dir=False)
    storage.write_hard_label(files["label"], arrays["label"], sync_dir=False)
    return list(files.values())


def _write_instances(files, prediction, height, width, contiguous_to_dataset_id):
    annotations = instance_annotations(prediction, height, width, contiguous_to_dataset_id)
    atomic_write_json(files["instances"], {"annotations": annotations}, sync_dir=False)
    return [files["instances"]]


def _class_offsets(cfg, root, keyed, model, scores, num_classes, ignore_label):
    """The per-class offsets of this folder's pseudo labels (see :mod:`.class_balance`): those meta.json holds
    when an earlier run fitted them, else fitted on an evenly spaced sample of the input (each rank predicts
    part of it; every rank fits the same offsets from the gathered pixels) and recorded in meta.json."""
    path = os.path.join(root, PseudoLabelFolder.META)
    with open(path) as f:
        meta = json.load(f)
    if "class_balance" in meta:
        return np.asarray(meta["class_balance"]["offsets"], dtype=np.float64)
    cb = cfg.OFFLINE_PSEUDO_LABELS.CLASS_BALANCE
    if len(cb.SHARES):
        target = np.asarray(cb.SHARES, dtype=np.float64)
    else:
        records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
        target = class_balance.label_class_shares(records, num_classes, ignore_label)
    sample = sorted(set(np.linspace(0, len(keyed) - 1, min(int(cb.SAMPLE_IMAGES), len(keyed))).round().astype(int)))
    rank, world_size = comm.get_rank(), comm.get_world_size()
    mine = [i for j, i in enumerate(sample) if j % world_size == rank]
    if mine and model is None:
        model = build_frozen_teacher(cfg, cfg.MODEL.WEIGHTS)
    pixels = []
    if mine:
        model.eval()
        device = _model_device(model, cfg)
        reader = _Prefetcher([keyed[i] for i in mine], cfg, max(1, int(cfg.DATALOADER.NUM_WORKERS)))
        try:
            with torch.no_grad():
                for i, (_, _, item) in zip(mine, reader):
                    if isinstance(item, UnreadableImageError):
                        continue  # reported by the labelling loop
                    image, size = item
                    probs = semantic_probabilities(model, image.to(device), size, cfg, scores)
                    pixels.append(class_balance.sample_pixels(probs, cb.SAMPLE_PIXELS, seed=i))
        finally:
            reader.close()
    pixels = [p for rank_pixels in comm.all_gather(pixels) for p in rank_pixels]
    if not pixels:
        raise ValueError(f"class-balanced pseudo labels: none of the {len(sample)} sampled input images could be read")
    pixels = np.concatenate(pixels)
    if pixels.shape[1] != num_classes:
        raise ValueError(f"the teacher predicts {pixels.shape[1]} classes but the class list has {num_classes}; "
                         "check MODEL.SEM_SEG_HEAD.NUM_CLASSES and the input's metadata")
    offsets, shares = class_balance.fit_class_offsets(pixels, target)
    if comm.is_main_process():
        teacher_shares = class_balance.argmax_shares(np.log(np.clip(pixels, 1e-12, None)), np.zeros(num_classes))
        meta["class_balance"] = {
            "offsets": offsets.tolist(), "target_shares": (target / target.sum()).tolist(),
            "teacher_shares": teacher_shares.tolist(), "balanced_shares": shares.tolist(),
            "sampled_pixels": int(pixels.shape[0]),
        }
        atomic_write_json(path, meta, indent=2)
        logger.info("Class balance: offsets %s fitted on %d pixels", np.round(offsets, 3).tolist(), pixels.shape[0])
    comm.synchronize()
    return offsets


def _progress_bar(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="pseudo labels", disable=not comm.is_main_process(), dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------- main loop

def generate_pseudo_labels(cfg, input, output_dir, model=None, teacher_config=None):
    """Label the dataset or image folder ``input`` with the teacher of ``cfg`` into ``output_dir``.

    Call it in every process of a (possibly single-process) launch. ``model``: an already built teacher
    (weights loaded); by default it is built from ``cfg`` and ``MODEL.WEIGHTS``. ``teacher_config``: the
    teacher's config file, recorded in meta.json. Returns the report (see the module docstring), the same
    on every rank; rank 0 writes report.json, dataset.json (and instances.json) after all ranks finish.
    """
    started = time.perf_counter()
    task, scores = teacher_output(cfg)
    settings = _settings(cfg, task)
    root = os.path.abspath(os.fspath(output_dir))
    records, source_meta = load_input_records(input)
    keyed = _keyed(records, input)
    class_meta, classes = _classes(task, source_meta, cfg)
    ignore_label = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    id_map = dict(class_meta.get("thing_dataset_id_to_contiguous_id", {}) or {}) if class_meta is not None else {}
    contiguous_to_dataset_id = {int(v): int(k) for k, v in id_map.items()}

    weights = cfg.MODEL.WEIGHTS
    meta = {
        "task": task,
        "source": os.path.abspath(os.path.expanduser(input)) if os.path.isdir(os.path.expanduser(input)) else input,
        "settings": settings,
        "teacher_config": os.path.abspath(teacher_config) if teacher_config else None,
        "teacher_weights": os.path.abspath(weights) if os.path.exists(weights) else weights,
        "teacher_meta_architecture": cfg.MODEL.META_ARCHITECTURE,
    }
    if task == "semantic":
        meta.update(stuff_classes=classes, ignore_label=ignore_label, threshold=settings["threshold"])
        for field in ("stuff_colors", "heldout_sem_seg_root"):
            if source_meta is not None and source_meta.get(field, None) is not None:
                meta[field] = source_meta.get(field)
    else:
        meta.update(thing_classes=classes, thing_dataset_id_to_contiguous_id={str(k): v for k, v in id_map.items()},
                    instance_score_threshold=settings["instance_score_threshold"])
        if class_meta is not None and class_meta.get("thing_colors", None) is not None:
            meta["thing_colors"] = class_meta.get("thing_colors")
    if comm.is_main_process():
        previous = _check_settings(root, meta)
        if previous is not None and "class_balance" in previous:
            meta["class_balance"] = previous["class_balance"]  # fitted once: labels made so far used these
        # Before any rank writes: a temporary file now can only be one a kill left behind.
        removed = _remove_interrupted_writes(root)
        if removed:
            logger.info("Removed %d temporary files left by an interrupted run in %s", len(removed), root)
        atomic_write_json(os.path.join(root, PseudoLabelFolder.META), meta, indent=2)
    comm.synchronize()

    layout = PseudoLabelFolder(root, settings)
    done = _read_progress(root)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    shard = [kr for i, kr in enumerate(keyed) if i % world_size == rank]
    todo = [(k, r) for k, r in shard
            if not (k in done and all(os.path.exists(p) for p in layout.files(k).values()))]
    already_done = len(shard) - len(todo)

    if todo and model is None:
        model = build_frozen_teacher(cfg, cfg.MODEL.WEIGHTS)
    offsets = None
    if "class_balance" in settings:
        offsets = _class_offsets(cfg, root, keyed, model, scores, len(classes), ignore_label)
    written, skipped = 0, []
    threads = max(1, int(cfg.DATALOADER.NUM_WORKERS))
    log = _ProgressLog(layout.progress_file(rank))
    bar = _progress_bar(len(todo))
    reader = _Prefetcher(todo, cfg, threads)
    writer = _Writer(log, threads)
    loop_started = time.perf_counter()
    try:
        if model is not None:
            model.eval()
            device = _model_device(model, cfg)
        with torch.no_grad():
            for key, record, item in reader:
                if isinstance(item, UnreadableImageError):
                    skipped.append({"file": item.path, "error": item.reason})
                    bar.update(1)
                    continue
                image, (height, width) = item
                files = layout.files(key)
                try:
                    image = image.to(device)
                    if task == "semantic":
                        prediction = semantic_probabilities(model, image, (height, width), cfg, scores)
                        if offsets is not None:
                            prediction = class_balance.apply_class_offsets(prediction, offsets)
                    else:
                        prediction = instance_predictions(model, image, height, width,
                                                          settings["instance_score_threshold"])
                except (RuntimeError, ValueError) as e:
                    raise RuntimeError(f"the teacher failed on image {record['file_name']} (WxH "
                                       f"{width}x{height}): {type(e).__name__}: {e}") from e
                if task == "semantic":
                    if prediction.shape[0] != len(classes):
                        raise ValueError(
                            f"the teacher predicts {prediction.shape[0]} classes but the class list has "
                            f"{len(classes)} ({classes}); check MODEL.SEM_SEG_HEAD.NUM_CLASSES and the input's metadata"
                        )
                    try:
                        arrays = storage.semantic_label_arrays(
                            prediction, settings["threshold"], ignore_label, confidence="confidence" in files,
                            top_k=settings["soft_top_k"] if "soft" in files else 0)
                    except ValueError as e:
                        raise ValueError(f"pseudo labels of image {record['file_name']}: {e}") from e
                    write = functools.partial(_write_semantic, files, arrays, len(classes))
                else:
                    write = functools.partial(_write_instances, files, prediction, height, width,
                                              contiguous_to_dataset_id)
                writer.submit(key, height, width, write)
                written += 1
                bar.update(1)
    except BaseException:
        writer.close(reraise=False)  # what was written is still recorded; this error is the one to report
        raise
    else:
        writer.close()
    finally:
        reader.close()
        bar.close()
        log.close()
    loop_seconds = time.perf_counter() - loop_started

    gathered = comm.all_gather(
        {"written": written, "already_done": already_done, "skipped": skipped, "seconds": loop_seconds}
    )
    total_written = sum(g["written"] for g in gathered)
    seconds = max(g["seconds"] for g in gathered)
    report = {
        "images": len(keyed),
        "written": total_written,
        "already_done": sum(g["already_done"] for g in gathered),
        "skipped": sorted((s for g in gathered for s in g["skipped"]), key=lambda s: s["file"]),
        "seconds": round(time.perf_counter() - started, 3),
        "images_per_s": round(total_written / seconds, 3) if seconds > 0 and total_written else 0.0,
    }
    if comm.is_main_process():
        _write_dataset(root, keyed, layout, task, id_map)
        atomic_write_json(os.path.join(root, PseudoLabelFolder.REPORT), report, indent=2)
        print(
            f"Pseudo labels in {root}: {report['images']} images, {report['written']} written, "
            f"{report['already_done']} already done, {len(report['skipped'])} unreadable images skipped"
            + (" (listed in report.json)" if report["skipped"] else "")
            + f", {report['images_per_s']} images/s"
        )
    comm.synchronize()
    return report


def _write_dataset(root, keyed, layout, task, id_map):
    """dataset.json (and instances.json) for every input image recorded as finished, in input order."""
    done = _read_progress(root)
    dataset = []
    coco_images, coco_annotations = [], []
    dataset_to_contiguous = {int(k): int(v) for k, v in id_map.items()}
    for index, (key, record) in enumerate(keyed):
        if key not in done:
            continue
        files = layout.files(key)
        entry = {"file_name": os.path.abspath(record["file_name"]), "image_id": key, **done[key]}
        if task == "semantic":
            entry["sem_seg_file_name"] = files["label"]
            if "confidence" in files:
                entry["confidence_file_name"] = files["confidence"]
            if "soft" in files:
                entry["soft_label_file_name"] = files["soft"]
        else:
            with open(files["instances"]) as f:
                annotations = json.load(f)["annotations"]
            coco_images.append({"id": index + 1, "file_name": entry["file_name"], "key": key, **done[key]})
            entry["annotations"] = []
            for ann in annotations:
                coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": index + 1, **ann})
                entry["annotations"].append({
                    "bbox": ann["bbox"], "bbox_mode": int(BoxMode.XYWH_ABS), "segmentation": ann["segmentation"],
                    "category_id": dataset_to_contiguous.get(ann["category_id"], ann["category_id"]),
                    "score": ann["score"], "iscrowd": 0,
                })
        dataset.append(entry)
    atomic_write_json(os.path.join(root, PseudoLabelFolder.DATASET), dataset)
    if task == "instance":
        with open(os.path.join(root, PseudoLabelFolder.META)) as f:
            classes = json.load(f)["thing_classes"]
        contiguous_to_dataset = {v: k for k, v in dataset_to_contiguous.items()}
        categories = [{"id": contiguous_to_dataset.get(i, i), "name": name} for i, name in enumerate(classes)]
        atomic_write_json(
            os.path.join(root, PseudoLabelFolder.INSTANCES),
            {"images": coco_images, "annotations": coco_annotations, "categories": categories},
        )
