"""Where the demo data lives, and generating it exactly once, atomically.

Layout under a root::

    <root>/manifest.json                        written last: its presence marks the root complete
    <root>/<domain>/<split>/images/*.jpg
    <root>/<domain>/<split>/sem_seg/*.png
    <root>/<domain>/<split>/instances.json
    <root>/<domain>/<split>/stats.json

Everything is generated into a temporary folder beside the root and renamed into place in one
``os.rename``, so a killed or failed generation never leaves a folder under the root's name. Processes
on one machine take a file lock so that only one of them generates; if another machine (or a process
without the lock) wins the race, the loser discards its copy.
"""
import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from ...utils.io import pid_alive
from .classes import (
    DEFAULT_COUNTS,
    DEFAULT_SEED,
    DOMAIN_CLASSES,
    DOMAIN_THING_CLASSES,
    DOMAINS,
    GENERATOR_VERSION,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    SPLITS,
)
from .writer import write_splits

try:  # POSIX only; elsewhere concurrent generators just race and the loser discards its copy
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["ENV_ROOT", "demo_root", "resolve_counts", "read_manifest", "is_complete", "generate_demo_data",
           "ensure_demo_data"]

logger = logging.getLogger(__name__)

ENV_ROOT = "SELFTRAIN_DEMO_ROOT"
MANIFEST = "manifest.json"


def demo_root():
    """``$SELFTRAIN_DEMO_ROOT`` if set, else ``~/.cache/selftrain_d2/demo/v<GENERATOR_VERSION>``."""
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser().absolute()
    return (Path.home() / ".cache" / "selftrain_d2" / "demo" / f"v{GENERATOR_VERSION}").absolute()


def resolve_counts(counts=None):
    """Images per domain and split: None (defaults), one int for every split, a {split: n} dict applied to
    both domains, or {domain: {split: n}}; splits not named keep their default."""
    out = {d: dict(DEFAULT_COUNTS[d]) for d in DOMAINS}
    if counts is None:
        return out
    if isinstance(counts, int):
        return {d: {s: counts for s in SPLITS} for d in DOMAINS}
    counts = dict(counts)
    if set(counts) <= set(SPLITS):
        counts = {d: counts for d in DOMAINS}
    unknown = set(counts) - set(DOMAINS)
    if unknown:
        raise ValueError(
            f"unknown demo domains {sorted(unknown)} in counts; expected keys from {list(DOMAINS)} or {list(SPLITS)}"
        )
    for d, per_split in counts.items():
        bad = set(per_split) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown demo splits {sorted(bad)} for domain {d!r}; expected {list(SPLITS)}")
        for s, n in per_split.items():
            if int(n) < 0:
                raise ValueError(f"negative image count {n} for {d}/{s}")
            out[d][s] = int(n)
    return out


def read_manifest(root):
    """The root's manifest dict, or None when the root is missing, incomplete or from another version."""
    try:
        with open(Path(root) / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("generator_version") != GENERATOR_VERSION:
        return None
    return manifest


def is_complete(root):
    return read_manifest(root) is not None


def _manifest(counts, seed):
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": [IMAGE_HEIGHT, IMAGE_WIDTH],
        "counts": counts,
        "classes": {d: list(DOMAIN_CLASSES[d]) for d in DOMAINS},
        "thing_classes": {d: list(DOMAIN_THING_CLASSES[d]) for d in DOMAINS},
    }


def _tmp_prefix(root):
    return f".{root.name}.tmp-{socket.gethostname()}-"


def _remove_stale_tmp(root):
    """Delete temporary folders left beside ``root`` by killed generators on this machine."""
    prefix = _tmp_prefix(root)
    if not root.parent.is_dir():
        return
    for entry in root.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            logger.info("removing %s, left by an interrupted demo data generation", entry)
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _lock(root):
    if fcntl is None:
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_and_publish(root, counts, seed, workers=None, replace=False):
    """Generate into a temporary sibling of ``root`` and rename it into place. Returns True if ours was
    published, False if a complete root appeared meanwhile (ours is then discarded)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f"{_tmp_prefix(root)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        tmp.mkdir()
        write_splits([(tmp / d / s, d, s, counts[d][s], seed) for d in DOMAINS for s in SPLITS], workers)
        with open(tmp / MANIFEST, "w") as f:  # last: marks the folder complete
            json.dump(_manifest(counts, seed), f, indent=1)
        trash = None
        if replace and root.exists():
            trash = root.parent / f"{_tmp_prefix(root)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.rename(root, trash)
        try:
            os.rename(tmp, root)  # atomic; fails if root is a non-empty folder (another process won)
        except OSError:
            if is_complete(root):
                logger.info("demo data at %s was completed by another process; discarding ours", root)
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(sum(c.values()) for c in counts.values())
    logger.info("generated %d demo images in %.1f s at %s", total, time.perf_counter() - start, root)
    return True


def generate_demo_data(root, counts=None, seed=DEFAULT_SEED, overwrite=False, workers=None):
    """Generate every domain and split into ``root`` (atomically) and return its path.

    ``counts``: see ``resolve_counts``. An existing non-empty ``root`` raises FileExistsError unless
    ``overwrite`` is set, in which case it is replaced only once the new data is complete. ``workers``:
    processes to render with (default 1, see ``writer.write_splits``); the output is the same for any
    number.
    """
    root = Path(root).expanduser().absolute()
    counts = resolve_counts(counts)
    with _lock(root):
        _remove_stale_tmp(root)
        occupied = root.exists() and (not root.is_dir() or any(root.iterdir()))
        if occupied and not overwrite:
            raise FileExistsError(f"{root} already exists; pass overwrite=True to replace it")
        _build_and_publish(root, counts, int(seed), workers, replace=occupied)
    return root


def ensure_demo_data(root=None, counts=None, seed=None, workers=None):
    """Return the demo data root, generating it first if it is not there yet.

    ``root`` defaults to ``demo_root()``. Existing complete data is reused whatever its counts; when
    ``counts`` or ``seed`` are given explicitly they must match it. A folder under the root's name that
    is not complete demo data (no manifest) is never used nor deleted: it raises instead.
    """
    root = Path(root).expanduser().absolute() if root is not None else demo_root()
    manifest = read_manifest(root)
    if manifest is None:
        with _lock(root):
            manifest = read_manifest(root)  # another process may have finished while we waited
            if manifest is None:
                _remove_stale_tmp(root)
                if root.exists() and (not root.is_dir() or any(root.iterdir())):
                    raise RuntimeError(
                        f"{root} exists but is not complete demo data (no valid {MANIFEST} for generator "
                        f"version {GENERATOR_VERSION}); delete it or set ${ENV_ROOT} to another folder"
                    )
                logger.info("generating the demo data set at %s (first use)", root)
                _build_and_publish(root, resolve_counts(counts), int(DEFAULT_SEED if seed is None else seed), workers)
                manifest = read_manifest(root)
    if counts is not None and manifest["counts"] != resolve_counts(counts):
        raise ValueError(f"demo data at {root} has counts {manifest['counts']}, not {resolve_counts(counts)}")
    if seed is not None and manifest["seed"] != int(seed):
        raise ValueError(f"demo data at {root} was generated with seed {manifest['seed']}, not {seed}")
    return root
