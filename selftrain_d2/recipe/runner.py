"""Run a recipe's stages in order, each in ``OUTPUT/<stage>/``, skipping those already done.

A stage is done when ``OUTPUT/<stage>/stage.json`` holds the hash of its fingerprint and of the hashes of
the stages it uses. A stage that was started with the same hash and killed is resumed (training from its
last checkpoint, labelling from its progress records); one started with another hash (the config or an
upstream stage changed) is moved aside to ``<stage>.stale-<hash>`` and run afresh, so nothing is lost.
``summary.json`` maps every stage that evaluated a model to its Detectron2 evaluator results.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time

from ..utils.io import atomic_write_json
from .spec import RecipeError
from .stages import STAGE_REGISTRY, RecipeContext

__all__ = ["run_recipe", "stage_hash"]

logger = logging.getLogger(__name__)

DONE_FILE = "stage.json"
STARTED_FILE = "stage.started.json"


def stage_hash(stage_type, fingerprint, dependency_hashes):
    """Hash of what a stage's result depends on: its type, its own fingerprint, its inputs' hashes."""
    payload = json.dumps(
        {"type": stage_type, "fingerprint": fingerprint, "deps": dependency_hashes}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _move_aside(stage_dir, old_hash):
    target = f"{stage_dir}.stale-{old_hash}"
    n = 1
    while os.path.exists(target):
        target = f"{stage_dir}.stale-{old_hash}-{n}"
        n += 1
    os.replace(stage_dir, target)
    logger.warning("Stage inputs changed: previous results moved to %s", target)


@contextlib.contextmanager
def output_lock(output_dir):
    """Hold ``OUTPUT/.recipe.lock`` exclusively: two recipe runs on one output folder would write into the
    same stage folders at once. The lock goes with the process, so a killed run leaves none behind."""
    path = os.path.join(output_dir, ".recipe.lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RecipeError(f"another recipe run is using {output_dir} ({f.read().strip() or 'lock held'}); wait "
                              "for it to finish or choose another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_recipe(recipe, output_dir, opts=(), num_gpus=1, python=None, report=True):
    """Run (or resume) every stage; returns the summary dict also written to ``OUTPUT/summary.json``."""
    os.makedirs(output_dir, exist_ok=True)
    with output_lock(output_dir):
        return _run_stages(recipe, output_dir, opts, num_gpus, python, report)


def _run_stages(recipe, output_dir, opts, num_gpus, python, report):
    ctx = RecipeContext(recipe, output_dir, opts=opts, num_gpus=num_gpus, python=python)
    hashes = {}
    timings = {}
    for spec in recipe.stages:
        stage = STAGE_REGISTRY.get(spec.type)(spec, ctx)
        deps = {name: hashes[name] for name in stage.dependencies()}
        h = stage_hash(spec.type, stage.fingerprint(), deps)
        hashes[spec.name] = h
        stage_dir = ctx.stage_dir(spec.name)
        done = _read(os.path.join(stage_dir, DONE_FILE))
        if done is not None and done.get("hash") == h:
            logger.info("Stage %s: done (hash %s), skipped", spec.name, h)
            ctx.results[spec.name] = stage.collect(stage_dir)
            timings[spec.name] = done.get("seconds")
            continue
        started = _read(os.path.join(stage_dir, STARTED_FILE))
        resume = started is not None and started.get("hash") == h and done is None
        if os.path.isdir(stage_dir) and not resume and os.listdir(stage_dir):
            _move_aside(stage_dir, (done or started or {}).get("hash", "unknown"))
        os.makedirs(stage_dir, exist_ok=True)
        atomic_write_json(os.path.join(stage_dir, STARTED_FILE), {"hash": h, "type": spec.type})
        logger.info("Stage %s (%s): %s", spec.name, spec.type, "resuming" if resume else "running")
        start = time.perf_counter()
        stage.run(stage_dir, resume)
        seconds = time.perf_counter() - start
        ctx.results[spec.name] = stage.collect(stage_dir)
        timings[spec.name] = seconds
        atomic_write_json(
            os.path.join(stage_dir, DONE_FILE), {"hash": h, "type": spec.type, "seconds": round(seconds, 1)}, indent=2
        )

    summary = {name: result["metrics"] for name, result in ctx.results.items() if result.get("metrics")}
    atomic_write_json(os.path.join(ctx.output_dir, "summary.json"), summary, indent=2, sort_keys=True)
    if report:
        from .report import write_report

        write_report(ctx, summary, timings)
    return summary
