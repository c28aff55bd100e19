"""Hyperparameter sweeps with the protocol of "Towards Comparable Knowledge Distillation in Semantic Image
Segmentation": tune learning rate and weight decay for the student alone and, separately, for student +
teacher; then tau and the KD loss weights at the best KD learning rate / weight decay. Each trial is a full
``train_net`` run (train + final evaluation) in its own folder. The command is ``selftrain_d2.cli.sweep``:

    python tools/sweep.py --config-file configs/demo/kd-sweep.yaml --output output/demo/kd-sweep
    python tools/sweep.py --config-file SWEEP_YAML --output DIR --storage postgresql://user@host/db  # shared

Trials live in an Optuna study per stage, in SQLite at ``DIR/study.db`` by default or in any SQLAlchemy URL
(``--storage`` or ``storage:``), so a killed sweep resumes where it stopped. Several processes, on one machine or
on many, can run the same command on one study (from several machines: ``--storage postgresql://...``): each
claims the next point under a lock they all share (a PostgreSQL advisory lock; for SQLite a lock file beside the
database), so no point is trained twice, and each returns once the whole sweep is done, with complete reports.
Grid points are enqueued by their parameters and skipped when a trial with the same parameters is complete,
waiting or running; a trial left "running" by a killed process (on this host: its process is gone; elsewhere:
its Optuna heartbeat stopped) is marked failed and its point is run again, resuming its training from the trial
folder's last checkpoint. Finished trials are never redone.

A trial can span machines: every machine runs the same command with ``--num-machines N --dist-url
tcp://HOST:PORT`` (HOST: machine rank 0's address) and its own ``--machine-rank``. Rank 0 runs the sweep and
records each training it starts in its trial; the other ranks watch the study and start their part of each one.

Outputs: ``DIR/results.csv`` (one row per finished trial: stage, parameters, metric), ``DIR/results.md``
(tables and the best student-only and best KD settings side by side), ``DIR/results.png``. With
``final_seeds``, once every stage is done, each stage's best setting is trained again at those seeds (seeds
other than the tuning ones, so the comparison is not flattered by the seed that chose the setting):
``DIR/final.csv`` has one row per run, and ``results.md`` a table of mean +- std per stage.

Sweep file (YAML)::

    name: kd-demo                       # study names are <name>/<stage>
    configs:                            # config files the stages refer to by key
      student: configs/demo/pspnet-effnetlite0-student.yaml
      kd: configs/demo/kd-pspnet-student.yaml
    metric: sem_seg/mIoU                # path into final_metrics.json
    direction: maximize
    overrides: [SOLVER.MAX_ITER, 100]   # KEY VALUE ... for every trial
    seeds: [7]                          # SEED of each run of a trial; the metric is their mean
    final_seeds: [1, 2, 3]              # optional: each stage's best setting trained again at these seeds
                                        # (a stage with `final: false` is left out)
    compare: [student, kd]              # best of the stages of each config, side by side
    stages:
      - name: student-lr-wd
        config: student
        grid: {SOLVER.BASE_LR: [0.005, 0.01], SOLVER.WEIGHT_DECAY: [0.0001, 0.00001]}
      - name: kd-lr-wd
        config: kd
        grid: {SOLVER.BASE_LR: [0.005, 0.01], SOLVER.WEIGHT_DECAY: [0.0001, 0.00001]}
      - name: kd-tau-weight
        config: kd
        inherit: [kd-lr-wd]             # the best parameters of these stages are fixed here
        grid: {DISTILL.PIXEL_KD.TAU: [1.0, 4.0], DISTILL.PIXEL_KD.WEIGHT: [0.5, 1.0]}
      - name: kd-tpe                    # optional: TPE instead of a grid
        config: kd
        sampler: tpe
        n_trials: 8
        space: {SOLVER.BASE_LR: {low: 0.001, high: 0.05, log: true}, DISTILL.PIXEL_KD.TAU: [1.0, 2.0, 4.0]}
"""
import argparse
import contextlib
import csv
import datetime
import hashlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings

import yaml

from selftrain_d2.orchestration.commands import (
    FINAL_METRICS, command, command_env, metric_value, read_metrics, resolve_path,
)
from selftrain_d2.utils import io as files

HOST = socket.gethostname()
FINAL_STUDY = "final-seeds"  # the study of the final-seed runs is <name>/final-seeds
POLL_SECONDS = 10.0  # how often a process with nothing to start looks at the study again




class SweepError(ValueError):
    """A sweep file that does not describe a valid sweep."""


class TrialFailed(RuntimeError):
    """A trial's training or evaluation failed; the sweep goes on with the next one."""


# ------------------------------------------------------------------------------------------------------
# Sweep file
# ------------------------------------------------------------------------------------------------------
def load_sweep(path):
    """The sweep file, checked, with defaults filled in."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    where = f"sweep file {path}"
    unknown = set(spec) - {"name", "configs", "metric", "direction", "overrides", "seeds", "final_seeds",
                           "compare", "stages", "storage", "num_gpus", "seed"}
    if unknown:
        raise SweepError(f"{where}: unknown keys {sorted(unknown)}")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    spec.setdefault("metric", "sem_seg/mIoU")
    spec.setdefault("direction", "maximize")
    spec.setdefault("overrides", [])
    spec.setdefault("seeds", [])
    spec.setdefault("final_seeds", [])
    if not all(isinstance(x, int) for x in spec["final_seeds"]):
        raise SweepError(f"{where}: final_seeds must be a list of integers, got {spec['final_seeds']!r}")
    spec.setdefault("num_gpus", 1)
    spec.setdefault("seed", 0)
    configs = spec.get("configs") or {}
    if not configs:
        raise SweepError(f"{where}: 'configs' must map names to config files")
    # A config file beside the sweep file is taken from there; otherwise the path is the trials' (current folder).
    spec["configs"] = {name: _beside(file, path) for name, file in configs.items()}
    spec.setdefault("compare", list(configs))
    if spec["direction"] not in ("maximize", "minimize"):
        raise SweepError(f"{where}: direction {spec['direction']!r}: use maximize or minimize")
    if len(spec["overrides"]) % 2:
        raise SweepError(f"{where}: overrides must be KEY VALUE pairs, got {spec['overrides']}")
    names = set()
    for i, stage in enumerate(spec.get("stages") or []):
        label = f"{where}: stage {i} ({stage.get('name', '?')})"
        unknown = set(stage) - {"name", "config", "grid", "sampler", "n_trials", "space", "inherit", "fixed", "final"}
        if unknown:
            raise SweepError(f"{label}: unknown keys {sorted(unknown)}")
        if not stage.get("name") or "/" in stage["name"] or stage["name"] in names:
            raise SweepError(f"{label}: every stage needs a unique 'name' without '/'")
        if stage["name"] == FINAL_STUDY:
            raise SweepError(f"{label}: the name {FINAL_STUDY!r} is taken by the final-seed runs")
        names.add(stage["name"])
        if stage.get("config") not in configs:
            raise SweepError(f"{label}: config {stage.get('config')!r} is not one of configs {sorted(configs)}")
        stage.setdefault("sampler", "grid")
        stage.setdefault("inherit", [])
        stage.setdefault("fixed", {})
        stage.setdefault("final", True)
        for other in stage["inherit"]:
            if other not in names - {stage["name"]}:
                raise SweepError(f"{label}: inherits {other!r}, which is not an earlier stage")
        if stage["sampler"] == "grid":
            grid = stage.get("grid") or {}
            if not grid or not all(isinstance(v, list) and v for v in grid.values()):
                raise SweepError(f"{label}: a grid stage needs 'grid': {{KEY: [values, ...], ...}}")
        elif stage["sampler"] == "tpe":
            if not stage.get("space") or int(stage.get("n_trials", 0)) <= 0:
                raise SweepError(f"{label}: a tpe stage needs 'space' and 'n_trials' > 0")
        else:
            raise SweepError(f"{label}: sampler {stage['sampler']!r}: use grid or tpe")
    if not names:
        raise SweepError(f"{where}: no stages")
    return spec


def _beside(file, sweep_file):
    found = resolve_path(file, relative_to=sweep_file)
    return found if os.path.exists(found) else file


def grid_points(grid):
    """Every combination of the grid's values, in a fixed order (the last key varies fastest)."""
    points = [{}]
    for key, values in grid.items():
        points = [dict(p, **{key: v}) for p in points for v in values]
    return points


def param_key(params):
    """A canonical string of a parameter dict: equal parameters give equal keys."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


# ------------------------------------------------------------------------------------------------------
# One trial
# ------------------------------------------------------------------------------------------------------
def _read_metric(metrics, path):
    try:
        return metric_value(metrics, path)
    except KeyError as e:
        raise TrialFailed(f"{e.args[0]} of final_metrics.json") from None


def _mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_trial(config_file, overrides, output_dir, num_gpus=1, resume=None, num_machines=1, machine_rank=0,
              dist_url="auto"):
    """Train and evaluate one configuration with the ``train_net`` command in a subprocess; returns the parsed
    ``final_metrics.json``. ``resume`` None: resume when ``output_dir`` has a last checkpoint. A machine of
    rank > 0 runs its part of a multi-machine training, whose metrics rank 0 writes, and returns None."""
    final = os.path.join(output_dir, FINAL_METRICS)
    if not os.path.isfile(final):
        os.makedirs(output_dir, exist_ok=True)
        if resume is None:
            resume = os.path.isfile(os.path.join(output_dir, "last_checkpoint"))
        cmd = [*command("train_net"), "--config-file", config_file, "--num-gpus", str(num_gpus),
               "--num-machines", str(num_machines), "--machine-rank", str(machine_rank), "--dist-url", dist_url]
        if resume:
            cmd.append("--resume")
        cmd += ["OUTPUT_DIR", output_dir] + [str(x) for x in overrides]
        log_path = os.path.join(output_dir, "sweep_trial.log")
        with open(log_path, "a") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, env=command_env(), stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0 or (machine_rank == 0 and not os.path.isfile(final)):
            raise TrialFailed(f"training failed (exit code {rc}); see {log_path}")
    if machine_rank > 0:
        return None
    metrics = read_metrics(output_dir)
    if metrics is None:
        raise TrialFailed(f"{final} is not readable JSON")
    return metrics


# ------------------------------------------------------------------------------------------------------
# Studies
# ------------------------------------------------------------------------------------------------------
def make_storage(url):
    import optuna

    if url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    # Trials of machines that die stop beating and are failed by the others after the grace period.
    return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=300)


class StudyLocks:
    """Mutual exclusion among all the processes that share a sweep's storage, around each read-then-write of
    a study (creating the tables or a study, failing stale trials and claiming the next point): on PostgreSQL an
    advisory lock, which the server drops with the holder's connection if its process dies; on SQLite a lock
    file beside the database. A process holds one lock at a time: never take one inside another."""

    def __init__(self, url, folder):
        import sqlalchemy

        parsed = sqlalchemy.engine.make_url(url)
        backend = parsed.get_backend_name()
        self._engine = self._file = None
        if backend == "postgresql":
            try:
                self._engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT",
                                                        poolclass=sqlalchemy.pool.NullPool)
            except ImportError as e:
                raise SweepError(f"--storage {parsed.render_as_string()}: no PostgreSQL driver ({e}); `make setup` "
                                 "installs psycopg2-binary") from e
            return
        if backend != "sqlite":
            warnings.warn(f"--storage {parsed.render_as_string()}: processes on other machines are not kept from "
                          f"training the same point on {backend}; share a sweep through PostgreSQL")
        database = parsed.database if backend == "sqlite" and parsed.database not in (None, "", ":memory:") else None
        self._file = f"{database}.lock" if database else os.path.join(folder, "study.lock")

    @contextlib.contextmanager
    def hold(self, name):
        if self._engine is not None:
            import sqlalchemy

            key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
            with self._engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        else:
            import fcntl

            with open(self._file, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                yield  # closing the file releases the lock


@contextlib.contextmanager
def heartbeat(storage, trial_id):
    """Optuna's heartbeat (what ``study.optimize`` keeps up) for a trial claimed with ``study.ask``: other
    machines fail the trial when it stops."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study):
    """Mark as failed the RUNNING trials whose process is gone: on this host by pid, elsewhere by heartbeat."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("owner", "")).rpartition(":")
        if host == HOST and pid.isdigit() and int(pid) != os.getpid() and not files.pid_alive(int(pid)):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # does nothing unless the storage has heartbeats


def _trial_params(trial):
    """A trial's own parameters: suggested (TPE) or the grid point it was enqueued with."""
    return trial.user_attrs.get("params") or trial.params


def _suggest(trial, name, spec):
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if not isinstance(spec, dict) or "low" not in spec or "high" not in spec:
        raise SweepError(f"search space of {name}: a list of values or {{low, high[, log, step, int]}}")
    if spec.get("int"):
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
    return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)),
                               step=spec.get("step"))


class Sweep:
    def __init__(self, spec, output, storage=None, num_gpus=None, retry_failed=False, log=print, num_machines=1,
                 machine_rank=0, dist_url="auto"):
        if (num_machines, machine_rank) != (1, 0):
            # train_net's own check, before any trial starts (it loads torch: a single machine goes without).
            from selftrain_d2.engine.launch import LaunchError, check_dist_options

            try:
                check_dist_options(num_machines, machine_rank, dist_url)
            except LaunchError as e:
                raise SweepError(str(e)) from e
        self.spec, self.output, self.log = spec, os.path.abspath(output), log
        self.retry_failed = retry_failed
        self.started = datetime.datetime.now()
        os.makedirs(self.output, exist_ok=True)
        self.storage_url = storage or spec.get("storage") or f"sqlite:///{os.path.join(self.output, 'study.db')}"
        self.num_gpus = num_gpus or spec["num_gpus"]
        self.num_machines, self.machine_rank, self.dist_url = num_machines, machine_rank, dist_url
        self.locks = StudyLocks(self.storage_url, self.output)
        self._storage = None
        self._studies = {}

    @property
    def storage(self):
        if self._storage is None:
            with self.locks.hold("storage"):  # two processes creating the tables at once collide
                self._storage = make_storage(self.storage_url)
        return self._storage

    def stage(self, name):
        return next(s for s in self.spec["stages"] if s["name"] == name)

    def study(self, stage):
        """The study of a stage (a stage dict), or of the final-seed runs (FINAL_STUDY)."""
        import optuna

        name = FINAL_STUDY if stage == FINAL_STUDY else stage["name"]
        if name not in self._studies:
            if name != FINAL_STUDY and stage["sampler"] == "tpe":
                sampler = optuna.samplers.TPESampler(seed=self.spec["seed"])
            else:
                # Every grid trial is enqueued with its parameters (_work), so this sampler never draws.
                # Optuna's GridSampler is not used: it counts failed trials as done and numbers grid points by
                # trial number, so a point whose trial was killed would never be run again.
                sampler = optuna.samplers.RandomSampler(seed=self.spec["seed"])
            storage, study_name = self.storage, f"{self.spec['name']}/{name}"
            with self.locks.hold("studies"):
                try:
                    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
                except KeyError:
                    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                                direction=self.spec["direction"])
            self._studies[name] = study
        return self._studies[name]

    def best_params(self, stage_name):
        from optuna.trial import TrialState

        done = self.study(self.stage(stage_name)).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            raise SweepError(f"stage {stage_name!r} has no finished trial to take the best parameters from")
        sign = 1 if self.spec["direction"] == "maximize" else -1
        best = max(done, key=lambda t: sign * t.value)
        return dict(best.user_attrs.get("fixed", {}), **_trial_params(best))

    def fixed_params(self, stage):
        fixed = {}
        for other in stage["inherit"]:
            fixed.update(self.best_params(other))
        fixed.update(stage["fixed"])
        return fixed

    def objective(self, stage, fixed):
        space = stage["grid"] if stage["sampler"] == "grid" else stage["space"]

        def objective(trial):
            if stage["sampler"] == "grid":
                # The enqueued point, not suggest_categorical: Optuna fixes a categorical's choices for the
                # whole study, so a grid extended later (a new learning rate) could not be suggested from.
                params = json.loads(trial.user_attrs["key"])
                trial.set_user_attr("params", params)
            else:
                params = {name: _suggest(trial, name, spec) for name, spec in space.items()}
            trial.set_user_attr("key", param_key(params))
            trial.set_user_attr("fixed", fixed)
            everything = dict(fixed, **params)
            trial.set_user_attr("output_dir", self.trial_folder(stage["config"], everything))
            values = []
            for seed in self.spec["seeds"] or [None]:
                self.log(f"[{stage['name']}] trial {trial.number}: {everything} seed {seed}")
                values.append(self.train(stage["config"], everything, seed, trial))
            trial.set_user_attr("values", values)
            value = sum(values) / len(values)
            self.log(f"[{stage['name']}] trial {trial.number}: {self.spec['metric']} = {value:.3f}")
            return value

        return objective

    def trial_folder(self, config_name, params):
        # Keyed by config and parameters, not by stage: equal parameters in two stages train once.
        digest = hashlib.sha1(param_key(params).encode()).hexdigest()[:10]
        return os.path.join(self.output, "trials", config_name, digest)

    def run_folder(self, config_name, params, seed=None):
        folder = self.trial_folder(config_name, params)
        return folder if seed is None else os.path.join(folder, f"seed{seed}")

    def train(self, config_name, params, seed, trial):
        """The metric of one training of ``config_name`` with ``params`` (and SEED ``seed``) for ``trial``, in
        its own folder (a finished one is read, not trained again)."""
        out = self.run_folder(config_name, params, seed)
        config_file = self.spec["configs"][config_name]
        overrides = list(self.spec["overrides"]) + [x for kv in params.items() for x in kv]
        overrides += [] if seed is None else ["SEED", seed]
        resume = os.path.isfile(os.path.join(out, "last_checkpoint"))
        dist = {"num_machines": self.num_machines, "machine_rank": 0, "dist_url": self.dist_url}
        shared = self.num_machines > 1 and not os.path.isfile(os.path.join(out, FINAL_METRICS))
        if shared:
            # What the other machines need to start their part of this training (join): the folder relative to
            # --output, as each machine has its own (the same one where --output is on a shared disk).
            run = {"key": f"{trial.number}:{seed}", "config_file": config_file, "resume": resume,
                   "folder": os.path.relpath(out, self.output), "overrides": [str(x) for x in overrides],
                   "num_gpus": self.num_gpus, **dist}
            trial.set_user_attr("run", run)
        try:
            metrics = run_trial(config_file, overrides, out, self.num_gpus, resume=resume, **dist)
        finally:
            if shared:
                trial.set_user_attr("run_done", run["key"])
        return _read_metric(metrics, self.spec["metric"])

    # --------------------------------------------------------------------------------------------------
    # Claiming trials
    # --------------------------------------------------------------------------------------------------
    def _left(self, study, want):
        """What is left to do in ``study``, which must hold a trial for each key in ``want`` (a list) or
        ``want`` trials (a number): (the keys or number of trials still to start, waiting, running trials)."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        # Failed trials (not killed ones) count as done, unless retrying: then once per process.
        counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
                   or (t.state == TrialState.FAIL and "error" in t.user_attrs
                       and (not self.retry_failed or t.datetime_start >= self.started))]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if isinstance(want, int):
            return max(0, want - len(counted)), waiting, running
        taken = {t.user_attrs.get("key") or param_key(t.system_attrs.get("fixed_params", t.params)) for t in counted}
        return [k for k in want if k not in taken], waiting, running

    def _work(self, study, want, objective, label, wait=False):
        """Claim and run the trials of ``study`` one at a time until nothing of ``want`` (see _left) is left
        to start; with ``wait``, also until the trials other processes run have finished, taking over the
        points of those that die. Returns whether the study is complete."""
        while True:
            trial = None
            with self.locks.hold(study.study_name):
                fail_stale_trials(study)
                left, waiting, running = self._left(study, want)
                if left or waiting:
                    if not waiting:
                        if isinstance(want, list):
                            study.enqueue_trial(json.loads(left[0]), user_attrs={"key": left[0]})
                    trial = study.ask()  # the oldest waiting trial, or a new one from the sampler
                    trial.set_user_attr("owner", f"{HOST}:{os.getpid()}")
            if trial is None:
                if not running:
                    return True
                if not wait:
                    return False
                time.sleep(POLL_SECONDS)
                continue
            self._run_claimed(study, trial, objective, label)
            self.write_reports()

    def _run_claimed(self, study, trial, objective, label):
        from optuna.trial import TrialState

        with heartbeat(self.storage, trial._trial_id):
            try:
                value = objective(trial)
            except TrialFailed as e:
                trial.set_user_attr("error", str(e))  # a real failure, not a kill: not retried by default
                study.tell(trial, state=TrialState.FAIL)
                self.log(f"[{label}] trial {trial.number} failed: {e}")
                return
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
        study.tell(trial, value)

    def _stage_want(self, stage):
        if stage["sampler"] == "grid":
            return [param_key(p) for p in grid_points(stage["grid"])]
        return int(stage["n_trials"])

    def run_stage(self, stage, wait=False):
        """Run the stage's trials that no process has started; with ``wait``, until the stage is complete."""
        objective = self.objective(stage, self.fixed_params(stage))
        return self._work(self.study(stage), self._stage_want(stage), objective, stage["name"], wait)

    # --------------------------------------------------------------------------------------------------
    # Final seeds
    # --------------------------------------------------------------------------------------------------
    def _final_keys(self, stage, params):
        return [param_key({"stage": stage["name"], "params": params, "seed": s}) for s in self.spec["final_seeds"]]

    def _final_want(self):
        return [k for s in self.spec["stages"] if s["final"] for k in self._final_keys(s, self.best_params(s["name"]))]

    def run_final_seeds(self):
        """Each stage's best setting at every final seed, as trials of the final-seed study (once every stage
        is complete)."""
        def objective(trial):
            point = json.loads(trial.user_attrs["key"])
            stage = self.stage(point["stage"])
            self.log(f"[final {stage['name']}] {point['params']} seed {point['seed']}")
            return self.train(stage["config"], point["params"], point["seed"], trial)

        return self._work(self.study(FINAL_STUDY), self._final_want(), objective, FINAL_STUDY, wait=True)

    def final_rows(self):
        """One row per stage whose final-seed runs have all finished: its best setting and their metrics."""
        from optuna.trial import TrialState

        done = {t.user_attrs.get("key"): t.value
                for t in self.study(FINAL_STUDY).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        rows = []
        for stage in (s for s in self.spec["stages"] if s["final"]):
            try:
                params = self.best_params(stage["name"])
            except SweepError:
                continue
            keys = self._final_keys(stage, params)
            if all(k in done for k in keys):
                rows.append({"stage": stage["name"], "config": stage["config"], "params": params,
                             "seeds": list(self.spec["final_seeds"]), "values": [done[k] for k in keys]})
        return rows

    # --------------------------------------------------------------------------------------------------
    # The sweep, from machine rank 0 and from the others
    # --------------------------------------------------------------------------------------------------
    def run(self):
        for stage in self.spec["stages"]:
            for other in stage["inherit"]:
                self.run_stage(self.stage(other), wait=True)  # the best setting is taken from a complete stage
            self.run_stage(stage)
        # Then help the other processes finish (and take over the points of any that die): every process
        # returns with the whole sweep done and reported.
        for stage in self.spec["stages"]:
            self.run_stage(stage, wait=True)
        if self.spec["final_seeds"]:
            self.run_final_seeds()
        return self.write_reports(self.final_rows() if self.spec["final_seeds"] else None)

    def finished(self):
        """Whether every stage, and every final-seed run, is complete."""
        def complete(study, want):
            return not any(self._left(study, want))

        if not all(complete(self.study(s), self._stage_want(s)) for s in self.spec["stages"]):
            return False
        return not self.spec["final_seeds"] or complete(self.study(FINAL_STUDY), self._final_want())

    def join(self):
        """Machine rank > 0: start this machine's part of every training that machine rank 0 of the same
        ``--dist-url`` starts, until the sweep is finished; then write the reports."""
        from optuna.trial import TrialState

        studies = [self.study(s) for s in self.spec["stages"]]
        studies += [self.study(FINAL_STUDY)] if self.spec["final_seeds"] else []
        joined = set()
        while True:
            runs = []
            for study in studies:
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    run = t.user_attrs.get("run")
                    if (run and run["dist_url"] == self.dist_url and run["num_machines"] == self.num_machines
                            and t.user_attrs.get("run_done") != run["key"]
                            and (t._trial_id, run["key"]) not in joined):
                        joined.add((t._trial_id, run["key"]))
                        runs.append((study, t, run))
            for study, t, run in runs:
                self.log(f"[{study.study_name}] trial {t.number}: machine {self.machine_rank} joins "
                         f"{run['config_file']} {' '.join(run['overrides'])}")
                try:
                    run_trial(run["config_file"], run["overrides"], os.path.join(self.output, run["folder"]),
                              run["num_gpus"], resume=run["resume"], num_machines=self.num_machines,
                              machine_rank=self.machine_rank, dist_url=self.dist_url)
                except TrialFailed as e:  # rank 0 records the trial's outcome
                    self.log(f"[{study.study_name}] trial {t.number}: machine {self.machine_rank}: {e}")
            if not runs:
                if self.finished():
                    break
                time.sleep(POLL_SECONDS)
        return self.write_reports(self.final_rows() if self.spec["final_seeds"] else None)

    # --------------------------------------------------------------------------------------------------
    # Reports
    # --------------------------------------------------------------------------------------------------
    def rows(self):
        """One dict per finished trial, in stage order."""
        from optuna.trial import TrialState

        rows = []
        for stage in self.spec["stages"]:
            for t in self.study(stage).get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                rows.append({
                    "stage": stage["name"],
                    "config": stage["config"],
                    "trial": t.number,
                    "params": dict(t.user_attrs.get("fixed", {}), **_trial_params(t)),
                    "metric": t.value,
                    "values": t.user_attrs.get("values", [t.value]),
                    "output_dir": t.user_attrs.get("output_dir", ""),
                })
        return rows

    def best_by_config(self, rows):
        sign = 1 if self.spec["direction"] == "maximize" else -1
        best = {}
        for name in self.spec["compare"]:
            candidates = [r for r in rows if r["config"] == name]
            if candidates:
                best[name] = max(candidates, key=lambda r: sign * r["metric"])
        return best

    def write_reports(self, final=None):
        """results.csv, results.md and results.png from the studies; with ``final`` (rows of run_final)
        also final.csv and a final-seeds table in results.md."""
        rows = self.rows()
        keys = sorted({k for r in rows for k in r["params"]})
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["stage", "config", "trial"] + keys + [self.spec["metric"], "output_dir"])
        for r in rows:
            writer.writerow([r["stage"], r["config"], r["trial"]] + [r["params"].get(k, "") for k in keys]
                            + [f"{r['metric']:.4f}", r["output_dir"]])
        files.atomic_write_text(os.path.join(self.output, "results.csv"), buf.getvalue())
        best = self.best_by_config(rows)
        markdown = self._markdown(rows, keys, best)
        if final:
            files.atomic_write_text(os.path.join(self.output, "final.csv"), self._final_csv(final, keys))
            markdown += self._final_markdown(final)
        files.atomic_write_text(os.path.join(self.output, "results.md"), markdown)
        if rows:
            self._plot(rows, best)
        return {"rows": rows, "best": best, "final": final}

    def _final_csv(self, final, keys):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["stage", "config"] + keys + ["seed", self.spec["metric"]])
        for r in final:
            for seed, value in zip(r["seeds"], r["values"]):
                writer.writerow([r["stage"], r["config"]] + [r["params"].get(k, "") for k in keys]
                                + [seed, f"{value:.4f}"])
        return buf.getvalue()

    def _final_markdown(self, final):
        seeds = final[0]["seeds"]
        lines = [f"## Each stage's best setting at seeds {', '.join(map(str, seeds))}", "",
                 f"| stage | config | setting | {self.spec['metric']} mean +- std | " + " | ".join(
                     f"seed {s}" for s in seeds) + " |", "|---|---|---|---|" + "---|" * len(seeds)]
        for r in final:
            setting = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
            mean, std = _mean_std(r["values"])
            lines.append(f"| {r['stage']} | {r['config']} | {setting} | {mean:.2f} +- {std:.2f} | "
                         + " | ".join(f"{v:.2f}" for v in r["values"]) + " |")
        return "\n".join(lines) + "\n"

    def _markdown(self, rows, keys, best):
        metric = self.spec["metric"]
        lines = [f"# Sweep {self.spec['name']}", "", f"Metric: `{metric}` ({self.spec['direction']}), "
                 f"{len(rows)} finished trials. Storage: `{self.storage_url}`.", ""]
        if best:
            lines += ["## Best settings side by side", ""]
            names = list(best)
            lines.append("| | " + " | ".join(names) + " |")
            lines.append("|---|" + "---|" * len(names))
            lines.append(f"| {metric} | " + " | ".join(f"{best[n]['metric']:.2f}" for n in names) + " |")
            lines.append("| stage | " + " | ".join(best[n]["stage"] for n in names) + " |")
            for k in sorted({k for n in names for k in best[n]["params"]}):
                lines.append(f"| {k} | " + " | ".join(str(best[n]["params"].get(k, "")) for n in names) + " |")
            lines.append("")
        for stage in self.spec["stages"]:
            srows = [r for r in rows if r["stage"] == stage["name"]]
            if not srows:
                continue
            sign = -1 if self.spec["direction"] == "maximize" else 1
            srows.sort(key=lambda r: sign * r["metric"])
            skeys = [k for k in keys if any(k in r["params"] for r in srows)]
            lines += [f"## Stage {stage['name']} ({stage['config']}, {stage['sampler']})", ""]
            lines.append("| trial | " + " | ".join(skeys) + f" | {metric} |")
            lines.append("|---|" + "---|" * (len(skeys) + 1))
            for r in srows:
                lines.append(f"| {r['trial']} | " + " | ".join(str(r["params"].get(k, "")) for k in skeys)
                             + f" | {r['metric']:.2f} |")
            lines.append("")
        return "\n".join(lines)

    def _plot(self, rows, best):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stages = [s for s in self.spec["stages"] if any(r["stage"] == s["name"] for r in rows)]
        fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4 * (len(stages) + 1), 4), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            srows = [r for r in rows if r["stage"] == stage["name"]]
            space = stage["grid"] if stage["sampler"] == "grid" else stage["space"]
            labels = ["\n".join(f"{k.split('.')[-1]}={r['params'][k]:.3g}" if isinstance(r["params"][k], float)
                                else f"{k.split('.')[-1]}={r['params'][k]}" for k in space) for r in srows]
            ax.bar(range(len(srows)), [r["metric"] for r in srows], color="tab:blue")
            ax.set_xticks(range(len(srows)), labels, fontsize=6)
            ax.set_title(stage["name"], fontsize=9)
            ax.set_ylabel(self.spec["metric"])
        ax = axes[0][-1]
        names = list(best)
        ax.bar(range(len(names)), [best[n]["metric"] for n in names], color="tab:green")
        ax.set_xticks(range(len(names)), names)
        ax.set_title("best per config", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        with files.atomic_write(os.path.join(self.output, "results.png"), "wb") as f:
            f.write(buf.getvalue())


def run(argv=None):
    """The sweep command (``selftrain_d2.cli.sweep``) on ``argv``: runs, joins or reports a sweep and returns
    its result (``rows``, ``best``, ``final``); exits with status 1 when no trial finished."""
    from selftrain_d2.version import add_version_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_version_argument(parser)
    parser.add_argument("--config-file", required=True, help="the sweep file (YAML)")
    parser.add_argument("--output", required=True, help="folder of the study database, trials and reports")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL of a shared study (default DIR/study.db)")
    parser.add_argument("--num-gpus", type=int, default=None, help="processes per trial (train_net.py --num-gpus)")
    parser.add_argument("--num-machines", type=int, default=1, help="machines per trial (train_net.py --num-machines)")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="this machine's rank in every trial: 0 runs the sweep, the others join its trainings")
    parser.add_argument("--dist-url", default="auto",
                        help="train_net.py --dist-url; several machines: tcp://HOST:PORT of machine rank 0 on each")
    parser.add_argument("--retry-failed", action="store_true", help="run again the points whose training failed")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the reports from the studies")
    args = parser.parse_args(argv)
    try:
        sweep = Sweep(load_sweep(args.config_file), args.output, args.storage, args.num_gpus, args.retry_failed,
                      num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url)
    except SweepError as e:
        parser.error(str(e))
    if args.report_only:
        result = sweep.write_reports(sweep.final_rows() if sweep.spec["final_seeds"] else None)
    elif args.machine_rank > 0:
        result = sweep.join()
    else:
        result = sweep.run()
    for name, row in result["best"].items():
        print(f"best {name}: {sweep.spec['metric']} = {row['metric']:.3f} with {row['params']} ({row['stage']})")
    for row in result.get("final") or []:
        mean, std = _mean_std(row["values"])
        print(f"final {row['stage']}: {sweep.spec['metric']} = {mean:.3f} +- {std:.3f} at seeds {row['seeds']}")
    print(f"results: {os.path.join(sweep.output, 'results.md')}")
    if not result["rows"]:
        print(f"sweep {sweep.spec['name']}: no trial finished (every one failed); see the sweep_trial.log files under "
              f"{os.path.join(sweep.output, 'trials')}", file=sys.stderr)
        raise SystemExit(1)
    return result
