"""Packaging: the commands of selftrain_d2.cli as console scripts, tools/ scripts and ``python -m`` modules, each
with --version; the licence; how orchestrators start commands and resolve the paths their files name."""
import importlib
from importlib import metadata
import os
import subprocess
import sys

import pytest

from selftrain_d2 import __version__
from selftrain_d2.cli import COMMANDS, version_string
from selftrain_d2.orchestration.commands import command, command_env, resolve_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_console_scripts_are_the_cli_commands():
    """What `make setup` installed from setup.py (which reads COMMANDS from selftrain_d2/cli/__init__.py)."""
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
               if e.dist is not None and e.dist.name.replace("-", "_") == "selftrain_d2"}
    assert scripts == {script: f"selftrain_d2.cli.{module}:main" for script, module in COMMANDS.items()}


@pytest.mark.parametrize("script,module", sorted(COMMANDS.items()))
def test_every_command_prints_its_version_and_has_a_tools_script(script, module, capsys):
    cli = importlib.import_module(f"selftrain_d2.cli.{module}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == version_string() and f"selftrain-d2 {__version__} (torch " in out
    with open(os.path.join(ROOT, "tools", f"{module}.py")) as f:
        assert f"from selftrain_d2.cli.{module} import main" in f.read()


def test_a_command_started_by_an_orchestrator_runs_this_package_from_any_folder(tmp_path):
    env = command_env({**os.environ, "PYTHONPATH": str(tmp_path / "elsewhere")})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(importlib.import_module(
        "selftrain_d2").__file__))
    code = "import selftrain_d2, sys; print(selftrain_d2.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert os.path.realpath(out.strip()) == os.path.realpath(importlib.import_module("selftrain_d2").__file__)
    assert command("train_net", "/x/python") == ["/x/python", "-m", "selftrain_d2.cli.train_net"]


def test_paths_of_a_file_resolve_beside_it_else_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "teacher.yaml").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "student.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    recipe = str(tmp_path / "recipes" / "recipe.yaml")
    assert resolve_path("teacher.yaml", relative_to=recipe) == str(tmp_path / "recipes" / "teacher.yaml")
    assert resolve_path("configs/student.yaml", relative_to=recipe) == str(tmp_path / "configs" / "student.yaml")
    assert resolve_path("missing.yaml", relative_to=recipe) == str(tmp_path / "missing.yaml")
    assert resolve_path("~/x.yaml") == os.path.expanduser("~/x.yaml")


def test_licence_is_apache_2_in_the_file_and_the_metadata():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    source = open(os.path.join(ROOT, "setup.py")).read()
    assert 'license="Apache-2.0"' in source and 'license_files=["LICENSE"]' in source


def _fresh(code):
    """``code``'s printed lines in a new interpreter with this checkout's package first on the path."""
    env = command_env(dict(os.environ))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_importing_the_package_is_light_and_any_config_has_every_subsystems_keys():
    # `import selftrain_d2` (and the version, and the sweep's orchestration) import neither torch nor Detectron2.
    assert _fresh("import sys, selftrain_d2, selftrain_d2.version, selftrain_d2.orchestration.sweep; "
                  "print(sorted(m for m in ('torch', 'detectron2') if m in sys.modules))") == ["[]"]
    # A config built where only the config layer was imported still has every subsystem's keys, added in
    # SUBSYSTEMS order (the same YAML as after register_all), and the components are registered.
    lazy, eager = (_fresh(
        f"{first}; from selftrain_d2.config import get_selftrain_cfg; import hashlib; "
        "from detectron2.modeling import META_ARCH_REGISTRY as R; "
        "print(hashlib.md5(get_selftrain_cfg().dump().encode()).hexdigest(), 'MaskFormer' in R, "
        "'SEMISUP' in get_selftrain_cfg(), 'OFFLINE_PSEUDO_LABELS' in get_selftrain_cfg())")
        for first in ("import selftrain_d2.config", "import selftrain_d2.engine, selftrain_d2; selftrain_d2.register_all()"))
    assert lazy == eager and lazy[1:] == ["True", "True", "True"]
    assert _fresh("from selftrain_d2 import add_selftrain_config; from detectron2.config import get_cfg; "
                  "print(add_selftrain_config(get_cfg()).DISTILL.TEACHER.WEIGHTS == '')") == ["True"]
