"""Run a recipe's stages in order, each in ``OUTPUT/<stage>/``, skipping those already done.

A stage is done when ``OUTPUT/<stage>/stage.json`` holds the hash of its fingerprint and of the hashes of
the stages it uses. A stage that was started with the same hash and killed is resumed (training from its
last checkpoint, labelling from its progress records); one started with another hash (the config or an
upstream stage changed) is moved aside to ``<stage>.stale-<hash>`` and run afresh, so nothing is lost.
``summary.json`` maps every stage that evaluated a model to its Detectron2 evaluator results. A stage is
recorded done only when its results are complete (a training's ``model_final.pth`` loads); a stage recorded
done whose results are not is resumed.

One run at a time per output folder: ``OUTPUT/.recipe.lock`` is held by the recipe and by every stage process
it starts. A run started while the stage processes of a killed one still live waits for them to end (up to
``ORPHAN_WAIT_S``), then refuses, naming them.

Across machines, every machine runs the recipe with its own ``machine_rank`` on one output folder that all
of them see (a shared filesystem: checkpoints, pseudo labels and indexes are written by rank 0 and read by
all). Machine rank 0 does everything above. The others keep no records: they run the ``DISTRIBUTED`` stages
(training, labelling, evaluation) together with rank 0, always with ``resume`` (a checkpoint is in the folder
exactly when rank 0 resumes), and after each stage wait for rank 0 to record it done, so the stages that
run on rank 0 only (centroid index, user stages) and the last writes of a training are finished before the
next stage starts. ``summary.json`` and the report are written by rank 0.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time

from ...utils.io import atomic_write_json, fsync_dir, pid_alive
from .errors import RecipeError
from .stages import OUTPUT_LOCK, STAGE_REGISTRY, RecipeContext

__all__ = ["run_recipe", "stage_hash"]

logger = logging.getLogger(__name__)

DONE_FILE = "stage.json"
STARTED_FILE = "stage.started.json"
WAIT_TIMEOUT_S = 2 * 3600  # how long machine ranks > 0 wait for rank 0 to finish a stage
ORPHAN_WAIT_S = 30  # how long a run waits for the stage processes of a killed run to exit (the kernel kills them)


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
    same stage folders at once. Stage commands inherit the lock, so it is released only when the recipe and
    every process it started have ended, killed or not."""
    path = os.path.join(output_dir, ".recipe.lock")
    with open(path, "a+") as f:
        _acquire(f, path, output_dir)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        token = OUTPUT_LOCK.set(f)
        try:
            yield
        finally:
            OUTPUT_LOCK.reset(token)
            fcntl.flock(f, fcntl.LOCK_UN)


def _acquire(f, path, output_dir):
    deadline = time.monotonic() + ORPHAN_WAIT_S
    waited = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        f.seek(0)
        holder = f.read().strip()
        recipe = re.match(r"pid (\d+)", holder)
        if recipe is None or pid_alive(int(recipe.group(1))):
            raise RecipeError(f"another recipe run is using {output_dir} ({holder or 'lock held'}); wait "
                              "for it to finish or choose another --output") from None
        # The run that holds the lock is dead: processes it started (a stage and its children) still hold it.
        if time.monotonic() > deadline:
            stages = "; ".join(holder.splitlines()[1:]) or "no stage recorded"
            raise RecipeError(
                f"the recipe run (pid {recipe.group(1)}) that used {output_dir} was killed, but processes it "
                f"started still run and write there, holding {path} ({stages}). Wait for them to end or stop "
                "them (kill -- -PROCESS_GROUP), then run the recipe again") from None
        if not waited:
            logger.warning("%s: the recipe run (pid %s) that held it was killed; waiting up to %.0f s for the "
                           "processes it started to end", path, recipe.group(1), ORPHAN_WAIT_S)
            waited = True
        time.sleep(0.2)


def run_recipe(recipe, output_dir, opts=(), num_gpus=1, python=None, report=True, num_machines=1, machine_rank=0,
               dist_url="auto", wait_timeout=WAIT_TIMEOUT_S):
    """Run (or resume) every stage; returns the summary dict also written to ``OUTPUT/summary.json``.

    ``num_gpus``, ``num_machines``, ``machine_rank`` and ``dist_url`` go to every training and labelling
    command; with ``num_machines > 1`` every machine calls this with its rank (see the module docstring)."""
    from ...engine.launch import LaunchError, check_dist_options

    try:
        check_dist_options(num_machines, machine_rank, dist_url)
    except LaunchError as e:
        raise RecipeError(str(e)) from None
    os.makedirs(output_dir, exist_ok=True)
    ctx = RecipeContext(recipe, output_dir, opts=opts, num_gpus=num_gpus, python=python, num_machines=num_machines,
                        machine_rank=machine_rank, dist_url=dist_url)
    if machine_rank > 0:
        return _follow_stages(recipe, ctx, wait_timeout)
    with output_lock(output_dir):
        return _run_stages(recipe, ctx, report)


def _stages(recipe, ctx):
    """``(spec, stage, hash, folder)`` of each stage in order; a hash covers the hashes of the stages used."""
    hashes = {}
    for spec in recipe.stages:
        stage = STAGE_REGISTRY.get(spec.type)(spec, ctx)
        deps = {name: hashes[name] for name in stage.dependencies()}
        hashes[spec.name] = stage_hash(spec.type, stage.fingerprint(), deps)
        yield spec, stage, hashes[spec.name], ctx.stage_dir(spec.name)


def _summary(ctx):
    return {name: result["metrics"] for name, result in ctx.results.items() if result.get("metrics")}


def _run_stages(recipe, ctx, report):
    timings = {}
    for spec, stage, h, stage_dir in _stages(recipe, ctx):
        done = _read(os.path.join(stage_dir, DONE_FILE))
        if done is not None and done.get("hash") == h:
            problem = stage.result_problem(stage_dir)
            if problem is None:
                logger.info("Stage %s: done (hash %s), skipped", spec.name, h)
                ctx.results[spec.name] = stage.collect(stage_dir)
                timings[spec.name] = done.get("seconds")
                continue
            logger.warning("Stage %s was recorded done, but %s: resuming it", spec.name, problem)
            os.remove(os.path.join(stage_dir, DONE_FILE))
            fsync_dir(stage_dir)
            done = None
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
        problem = stage.result_problem(stage_dir)
        if problem is not None:
            raise RecipeError(f"stage {spec.name!r} ended, but {problem}; it is not recorded done: run the recipe "
                              "again to resume it")
        ctx.results[spec.name] = stage.collect(stage_dir)
        timings[spec.name] = seconds
        atomic_write_json(
            os.path.join(stage_dir, DONE_FILE), {"hash": h, "type": spec.type, "seconds": round(seconds, 1)}, indent=2
        )

    summary = _summary(ctx)
    atomic_write_json(os.path.join(ctx.output_dir, "summary.json"), summary, indent=2, sort_keys=True)
    if report:
        from .report import write_report

        write_report(ctx, summary, timings)
    return summary


def _follow_stages(recipe, ctx, wait_timeout):
    """Machine rank > 0: the distributed stages together with rank 0, and rank 0's record of every stage."""
    logger.info("Machine rank %d of %d: machine rank 0 keeps the stage records in %s", ctx.machine_rank,
                ctx.num_machines, ctx.output_dir)
    for spec, stage, h, stage_dir in _stages(recipe, ctx):
        # A stage recorded done with incomplete results is resumed by rank 0, which then needs this machine.
        if _done_hash(stage_dir) != h or stage.result_problem(stage_dir) is not None:
            if stage.DISTRIBUTED:
                logger.info("Stage %s (%s): running with machine rank 0", spec.name, spec.type)
                stage.run(stage_dir, True)
            _wait_until_done(spec.name, stage_dir, h, wait_timeout)
        ctx.results[spec.name] = stage.collect(stage_dir)
    return _summary(ctx)


def _done_hash(stage_dir):
    return (_read(os.path.join(stage_dir, DONE_FILE)) or {}).get("hash")


def _wait_until_done(name, stage_dir, h, timeout, poll=1.0):
    deadline = time.monotonic() + timeout
    if _done_hash(stage_dir) != h:
        logger.info("Stage %s: waiting for machine rank 0 to record it done", name)
    while _done_hash(stage_dir) != h:
        if time.monotonic() > deadline:
            raise RecipeError(
                f"stage {name!r}: machine rank 0 did not record it done in {os.path.join(stage_dir, DONE_FILE)} "
                f"within {timeout:.0f} s. A recipe across machines needs its output folder on a filesystem that "
                "every machine shares; otherwise see machine rank 0's log for a failure")
        time.sleep(poll)
