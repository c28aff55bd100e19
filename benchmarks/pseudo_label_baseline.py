"""Today's pseudo-label code as the benchmarks' baseline, read from git instead of copied into the tree.

:func:`load_baseline` imports ``selftrain_d2/pseudo_labels`` as it was at ``BASELINE_COMMIT`` (before issue 26:
host-side argmax / argsort, one image at a time, an fsync per progress line) as the package
``selftrain_d2._pseudo_labels_baseline``; its relative imports (``..data``, ``..utils``) resolve to today's
package, as they did then.
"""
import importlib
import os
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_COMMIT = "2f95024"
_NAME = "selftrain_d2._pseudo_labels_baseline"


def load_baseline(commit=BASELINE_COMMIT):
    """The baseline package (its ``generate`` and ``storage`` modules), imported once per process."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    import selftrain_d2  # noqa: F401  (the parent package)

    folder = tempfile.mkdtemp(prefix="pseudo_labels_baseline_")
    for name in ("generate", "storage", "tta"):
        try:
            source = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:selftrain_d2/pseudo_labels/{name}.py"],
                                    check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"cannot read the baseline {name}.py at commit {commit} with git (a full clone is needed): {e}")
        with open(os.path.join(folder, f"{name}.py"), "w") as f:
            f.write(source)
    package = types.ModuleType(_NAME)
    package.__path__ = [folder]
    sys.modules[_NAME] = package
    for name in ("storage", "tta", "generate"):
        setattr(package, name, importlib.import_module(f"{_NAME}.{name}"))
    return package
