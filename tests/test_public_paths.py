"""The documented public paths that the layout change (core/, training/, evaluation/, data/, commands/)
moved keep working: the core's short names, `ddpm_jax.load_run`, `python -m ddpm_jax.evaluate` /
`python -m ddpm_jax.ablation`, `from ddpm_jax import evaluate`, and the console commands' entry points."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

import ddpm_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIASES = sorted(ddpm_jax.ALIASES)


def test_the_documented_short_names_are_the_core_modules():
    for name in ("schedules", "diffusion", "vdm"):
        assert ddpm_jax.ALIASES[name] == f"ddpm_jax.core.{name}"
    from ddpm_jax import diffusion, schedules, vdm
    from ddpm_jax.core import diffusion as core_diffusion
    from ddpm_jax.core import schedules as core_schedules
    from ddpm_jax.core import vdm as core_vdm

    assert schedules is core_schedules and diffusion is core_diffusion and vdm is core_vdm


@pytest.mark.parametrize("name", ALIASES)
def test_from_ddpm_jax_import_an_alias_gives_the_module_itself(name):
    namespace = {}
    exec(f"from ddpm_jax import {name}", namespace)
    assert namespace[name] is importlib.import_module(ddpm_jax.ALIASES[name])


@pytest.mark.parametrize("name", ALIASES)
def test_import_ddpm_jax_dot_alias_gives_the_module_itself(name, monkeypatch):
    monkeypatch.delitem(sys.modules, f"ddpm_jax.{name}", raising=False)  # through the alias finder, not a cache
    target = importlib.import_module(ddpm_jax.ALIASES[name])
    namespace = {}
    exec(f"import ddpm_jax.{name}", namespace)
    assert getattr(namespace["ddpm_jax"], name) is target
    assert sys.modules[f"ddpm_jax.{name}"] is target
    assert importlib.import_module(f"ddpm_jax.{name}") is target
    assert target.__spec__.name == ddpm_jax.ALIASES[name]  # its own name kept: reload and pickle find it


def test_load_run_is_the_run_modules():
    from ddpm_jax import load_run, run

    assert ddpm_jax.load_run is run.load_run and load_run is run.load_run
    assert ddpm_jax.Run is run.Run


@pytest.mark.parametrize("shim,command", [("evaluate", "evaluate"), ("ablation", "ablate")])
def test_from_ddpm_jax_import_a_command_exposes_its_cli_main(shim, command):
    module = importlib.import_module(f"ddpm_jax.{shim}")
    assert module.cli_main is importlib.import_module(f"ddpm_jax.commands.{command}").cli_main


@pytest.mark.parametrize("shim,flag", [("evaluate", "--workdir"), ("ablation", "--grid")])
def test_python_dash_m_the_old_command_names_runs_the_command(shim, flag):
    """A fresh interpreter (a few seconds: evaluate imports jax), with this environment's PYTHONPATH."""
    proc = subprocess.run(
        [sys.executable, "-m", f"ddpm_jax.{shim}", "--help"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # absl's --help prints the command's flags and exits with status 1 (absl.app.HelpFlag), by design.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"  {flag}" in proc.stdout and "Try --helpfull" in proc.stdout, proc.stdout[-3000:]


def _console_scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_each_console_script_names_an_importable_function(script):
    module_name, _, attr = _console_scripts()[script].partition(":")
    function = getattr(importlib.import_module(module_name), attr)
    assert callable(function), (script, module_name, attr)
