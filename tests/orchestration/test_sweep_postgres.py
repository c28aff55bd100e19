"""The sweep on a real PostgreSQL server: two sweep processes (as on two machines) share one study."""
import csv
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from ..conftest import ROOT
from ..helpers import run_together

SWEEP_PY = os.path.join(ROOT, "selftrain_d2", "orchestration", "sweep.py")


def _server_binaries():
    """The folder holding PostgreSQL's initdb and postgres: from PATH, or Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    folders = [os.path.dirname(os.path.realpath(found))] if found else []
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in folders:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "postgres")):
            return folder
    return None


def _server_account():
    """The account the server runs as: this one, or, as root (which PostgreSQL refuses), postgres or nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    pytest.skip("running as root, and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL as")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server on loopback for this module's tests, in a temporary folder: its host:port."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (requirements/base.txt) is not installed")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres) on PATH or in /usr/lib/postgresql/*/bin")
    account = _server_account()
    as_account = {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    # Not under pytest's tmp_path: pytest-of-root is closed to other accounts.
    folder = tempfile.mkdtemp(prefix="sweep-postgres-")
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    env = dict(os.environ, LC_ALL="C", LANG="C")
    data = os.path.join(folder, "data")
    server = None
    try:
        init = subprocess.run([os.path.join(binaries, "initdb"), "-D", data, "-U", "sweep", "--auth=trust",
                               "--no-sync", "--encoding=UTF8", "--locale=C"],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=120, **as_account)
        if init.returncode != 0:
            pytest.skip(f"initdb failed (exit code {init.returncode}): {init.stdout[-1500:]}{init.stderr[-1500:]}")
        log = os.path.join(folder, "server.log")
        for _ in range(3):  # another process may take the free port first
            port = _free_port()
            with open(log, "w") as f:
                server = subprocess.Popen([os.path.join(binaries, "postgres"), "-D", data, "-k", folder,
                                           "-h", "127.0.0.1", "-p", str(port), "-c", "fsync=off"],
                                          cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT, **as_account)
            deadline = time.monotonic() + 60
            while server.poll() is None and time.monotonic() < deadline:
                try:
                    psycopg2.connect(host="127.0.0.1", port=port, user="sweep", dbname="postgres",
                                     connect_timeout=2).close()
                    break
                except psycopg2.OperationalError:
                    time.sleep(0.2)
            else:
                server.kill()
                server.wait()
                server = None
                continue
            break
        if server is None:
            with open(log) as f:
                pytest.skip(f"the PostgreSQL server did not start; its log ends: {f.read()[-1500:]}")
        yield f"127.0.0.1:{port}"
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, stop
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def database(postgres_server, request):
    """A new database on the server, named after the test: its SQLAlchemy URL."""
    import psycopg2

    name = request.node.name.lower()[:60]
    connection = psycopg2.connect(f"postgresql://sweep@{postgres_server}/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return f"postgresql://sweep@{postgres_server}/{name}"


SWEEP_YAML = """
name: shared
configs: {student: student.yaml, kd: kd.yaml}
metric: sem_seg/mIoU
overrides: [SOLVER.MAX_ITER, 5]
seeds: [7]
final_seeds: [1, 2]
stages:
  - name: student-lr-wd
    config: student
    grid: {SOLVER.BASE_LR: [0.01, 0.02, 0.03], SOLVER.WEIGHT_DECAY: [0.0001, 0.001]}
  - name: kd-lr
    config: kd
    grid: {SOLVER.BASE_LR: [0.01, 0.02, 0.03]}
  - name: kd-tau
    config: kd
    inherit: [kd-lr]
    grid: {DISTILL.PIXEL_KD.TAU: [1.0, 2.0, 4.0]}
"""

# One "machine": the sweep with a fake training that logs each call and takes a moment. Both processes start
# together (once both have imported their libraries), so they create the tables, the studies and their first
# trials at the same time.
_MACHINE = """
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("sweep", sys.argv[1])
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)
import optuna, psycopg2, sqlalchemy
sweep.POLL_SECONDS = 0.2
calls, ready = sys.argv[2], sys.argv[3]

def fake(config, overrides, output_dir, num_gpus=1, **dist):
    with open(calls, "a") as f:
        f.write(json.dumps([os.getpid(), config, [str(x) for x in overrides]]) + "\\n")
    time.sleep(0.3)
    o = dict(zip(overrides[::2], overrides[1::2]))
    value = 100 * float(o["SOLVER.BASE_LR"]) + 1000 * float(o.get("SOLVER.WEIGHT_DECAY", 0))
    return {"sem_seg": {"mIoU": 50.0 + value + float(o.get("DISTILL.PIXEL_KD.TAU", 0)) + float(o["SEED"]) / 10}}

sweep.run_trial = fake
open(os.path.join(ready, str(os.getpid())), "w").close()
deadline = time.time() + 120
while len(os.listdir(ready)) < 2 and time.time() < deadline:
    time.sleep(0.01)
sweep.run(sys.argv[4:])
"""


def test_two_processes_split_the_grid_on_postgres_and_both_report_every_point(tmp_path, database):
    import optuna
    from optuna.trial import TrialState

    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML)
    calls = tmp_path / "calls.jsonl"
    (tmp_path / "ready").mkdir()
    # One output folder each, as on two machines without a shared disk.
    machines = [[sys.executable, "-c", _MACHINE, SWEEP_PY, str(calls), str(tmp_path / "ready"), "--config-file",
                 str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / name), "--storage", database]
                for name in ("a", "b")]
    codes, logs, pids = run_together(machines, timeout=180)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    trained = [json.loads(line) for line in calls.read_text().splitlines()]
    runs = [(config, tuple(overrides)) for _, config, overrides in trained]
    assert len(runs) == len(set(runs)), "a training ran twice"
    assert len(runs) == 6 + 3 + 3 + 3 * 2  # three stages' grids, then each stage's best at two seeds
    assert {pid for pid, _, _ in trained} == set(pids)  # both machines trained

    # Every point of every grid has exactly one trial, finished; nothing is left waiting, running or failed.
    grids = {"student-lr-wd": 6, "kd-lr": 3, "kd-tau": 3, "final-seeds": 6}
    for stage, size in grids.items():
        trials = optuna.load_study(study_name=f"shared/{stage}", storage=database).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * size, stage
        assert len({t.user_attrs["key"] for t in trials}) == size, stage
    kd_tau = [o for _, c, o in trained if "DISTILL.PIXEL_KD.TAU" in o and "7" in o]
    assert all(dict(zip(o[::2], o[1::2]))["SOLVER.BASE_LR"] == "0.03" for o in kd_tau)  # kd-lr's best, complete

    # Both machines end with the whole table: the one that finished first waited for the other's last trial.
    for name in ("a", "b"):
        with open(tmp_path / name / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted((r["stage"], r["SOLVER.BASE_LR"], r["SOLVER.WEIGHT_DECAY"], r["DISTILL.PIXEL_KD.TAU"])
                      for r in rows) == sorted(
            [("student-lr-wd", lr, wd, "") for lr in ("0.01", "0.02", "0.03") for wd in ("0.0001", "0.001")]
            + [("kd-lr", lr, "", "") for lr in ("0.01", "0.02", "0.03")]
            + [("kd-tau", "0.03", "", tau) for tau in ("1.0", "2.0", "4.0")])
        with open(tmp_path / name / "final.csv") as f:
            final = list(csv.DictReader(f))
        assert sorted((r["stage"], r["seed"]) for r in final) == [
            (stage, seed) for stage in ("kd-lr", "kd-tau", "student-lr-wd") for seed in ("1", "2")]
        assert not list((tmp_path / name).glob(".results.csv.*"))  # no temporary file left behind
