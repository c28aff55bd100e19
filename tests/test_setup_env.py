"""tools/setup_env.sh: the torch-build override (TORCH_SPEC, TORCH_INDEX_URL, pip's index variables), dry-run."""
import hashlib
import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

STAMP_INPUTS = ["requirements/base.txt", "requirements/detectron2.txt", "requirements/constraints.txt", "setup.py"]
TORCH_PINNED = re.compile(r"^(torch|torchvision|triton|nvidia-\S+|cuda-\S+)==", re.I | re.M)


@pytest.fixture
def venv(tmp_path):
    """A venv folder stamped as set up by the default (pinned) install; nothing is installed."""
    folder = tmp_path / "venv"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").symlink_to(sys.executable)
    digest = hashlib.sha256(b"".join(open(os.path.join(ROOT, p), "rb").read() for p in STAMP_INPUTS)).hexdigest()
    (folder / ".setup-stamp").write_text(digest + "\n")
    return folder


def _setup(venv, tmp_path, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL", "PIP_INDEX_URL",
                                                              "PIP_EXTRA_INDEX_URL", "SETUP_DRY_RUN")}
    env = dict(clean, VENV=str(venv), PYTHON=os.path.join(sys.base_prefix, "bin", "python3"), SETUP_DRY_RUN="1",
               TMPDIR=str(tmp_path), **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "setup_env.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def _pip_installs(out):
    return [line for line in out.splitlines() if line.startswith("+ ") and " -m pip install " in line]


def test_default_install_is_unchanged_and_up_to_date(venv, tmp_path):
    code, out = _setup(venv, tmp_path)
    assert code == 0 and "is up to date" in out, out
    (venv / ".setup-stamp").write_text("older\n")
    code, out = _setup(venv, tmp_path)
    first = _pip_installs(out)[0]
    assert code == 0 and re.search(r"-r requirements/base.txt( -r requirements/detectron2.txt)? "
                                   r"-c requirements/constraints.txt$", first), out


def test_torch_override_installs_torch_from_its_index_without_the_cuda_pins(venv, tmp_path):
    code, out = _setup(venv, tmp_path, TORCH_SPEC="torch==2.7.1 torchvision==0.22.1",
                       TORCH_INDEX_URL="https://download.pytorch.org/whl/cu118")
    assert code == 0 and "is up to date" not in out, out  # the override is part of the stamp: a reinstall
    torch_step, rest = _pip_installs(out)[:2]
    assert torch_step.endswith("torch==2.7.1 torchvision==0.22.1 --index-url https://download.pytorch.org/whl/cu118")
    base, constraints = re.search(r"-r (\S+/base\.txt)( -r requirements/detectron2.txt)? -c (\S+/constraints\.txt)$",
                                  rest).group(1, 3)
    assert not base.startswith("requirements/")
    kept = open(constraints).read()
    assert not TORCH_PINNED.search(kept) and not TORCH_PINNED.search(open(base).read())
    original = open(os.path.join(ROOT, "requirements", "constraints.txt")).read()
    assert len(TORCH_PINNED.findall(original)) >= 5  # torch, torchvision, triton and the CUDA runtime
    assert "numpy==1.26.4" in kept and "numpy==1.26.4" in open(base).read()  # every other pin stays


def test_pip_index_variables_alone_keep_the_pinned_torch_but_lift_its_cuda_pins(venv, tmp_path):
    code, out = _setup(venv, tmp_path, PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cu126")
    assert code == 0 and "is up to date" not in out, out
    torch_step = _pip_installs(out)[0]
    assert torch_step.endswith("--disable-pip-version-check torch==2.14.1 torchvision==0.29.1"), torch_step


@pytest.mark.parametrize("spec", ["torch==2.7.1", "torch==2.7.1 torchvision==0.22.1 torchaudio==2.7.1"])
def test_torch_spec_must_be_a_torch_and_torchvision_pair(venv, tmp_path, spec):
    code, out = _setup(venv, tmp_path, TORCH_SPEC=spec)
    assert code == 1 and f"TORCH_SPEC='{spec}' must name torch and torchvision" in out
    assert not _pip_installs(out)
