"""File helpers shared by every writer in the package: nothing is ever half-written."""
import contextlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "pid_alive"]


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A kill or an exception leaves either the old file or no file, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path, obj, **kwargs):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **kwargs)


def pid_alive(pid):
    """Whether process ``pid`` exists on this host (a lock or trial left by a killed process is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
