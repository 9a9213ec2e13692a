"""A config holds the shared sections and its method's own; a field the method does not read is an
error before any work (training.validation), on the command line, in a config file and in the
ablation runner's --set, never silently ignored (a grid over it would train identical cells)."""

import os
import subprocess
import sys

import ml_collections
import pytest

from ddpm_jax import configuration
from ddpm_jax.commands import ablate, cli
from ddpm_jax.errors import ConfigError
from ddpm_jax.training import validation
from ddpm_jax.training.guards import NonfiniteGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The three silent cases: DDPM fields on the VDM main job (they trained 5 minutes and exited 0).
SILENT_CASES = [
    "diffusion.schedule=cosinee",
    "diffusion.parameterization=epsilonn",
    "diffusion.num_timesteps=0",
]


def _shipped_configs():
    for name in configuration.names():
        module = configuration.import_file(configuration.resolve(name))
        for variant in (None, *getattr(module, "VARIANTS", ())):
            yield f"{name}:{variant}" if variant else name, module.get_config(variant)


def test_every_shipped_config_holds_only_what_its_method_reads():
    for spec, config in _shipped_configs():
        validation.validate_config(config, num_devices=1)  # raises for the first unread section or field
        method = validation.methods.method_class(config)
        assert set(config.keys()) <= {"seed", "method", *validation.read_sections(method)}, spec


@pytest.mark.parametrize("override", SILENT_CASES)
def test_a_ddpm_field_on_the_vdm_main_job_is_refused_by_the_command_line(override):
    field = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        cli.check_config_flags(["train.py", f"--config.{override}", "--workdir=unused"], "vdm")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config.{field}: method 'vdm' does not read config.diffusion"), message
    assert "its own section is config.vdm" in message and "--config=ddpm" in message


def test_the_same_fields_are_read_by_the_ddpm():
    config = cli.check_config_flags(["train.py", "--config.diffusion.num_timesteps=10"], "ddpm")
    assert config.diffusion.num_timesteps == 1000  # checked only: absl applies the override
    with pytest.raises(ConfigError, match="config.diffusion.num_timesteps: must be an integer >= 1"):
        config.diffusion.num_timesteps = 0
        validation.validate_config(config, num_devices=1)


def test_a_model_field_on_a_vae_is_refused():
    with pytest.raises(ConfigError, match=r"config.model.ch: method 'vae' does not read config.model .*config.vae"):
        cli.check_config_flags(["train.py", "--config.model.ch=64"], "vae")


def test_an_unknown_field_of_a_read_section_keeps_its_close_match():
    with pytest.raises(
        ConfigError, match="unknown config field config.vdm.gamma_mn. Did you mean config.vdm.gamma_min"
    ):
        cli.check_config_flags(["train.py", "--config.vdm.gamma_mn=-10"], "vdm")


def test_a_config_file_with_an_unread_section_or_field_is_refused():
    config = configuration.load_config_file("vdm:runlocal")
    config.diffusion = ml_collections.ConfigDict({"schedule": "cosine"})
    with pytest.raises(ConfigError, match="config.diffusion.schedule: method 'vdm' does not read config.diffusion"):
        validation.validate_config(config, num_devices=1)
    config = configuration.load_config_file("vdm:runlocal")
    config.vdm.gamma_mn = -10.0  # a typo in the method's own section
    with pytest.raises(ConfigError, match="config.vdm.gamma_mn: method 'vdm' does not read this field. Did you mean"):
        validation.validate_config(config, num_devices=1)
    config = configuration.load_config_file("ddpm:runlocal")
    config.training.sample_evry = 3
    with pytest.raises(ConfigError, match="config.training.sample_evry: .*Did you mean config.training.sample_every"):
        validation.validate_config(config, num_devices=1)


def test_a_saved_config_from_before_keeps_loading():
    """load_run drops what the method never read from an older config.json (a VDM run's diffusion)."""
    old = configuration.load_config_file("ddpm")
    old.method = "vdm"
    old.vdm = configuration.load_config_file("vdm").vdm
    cleaned = validation.without_unread_fields(old)
    assert cleaned.to_dict() == {k: v for k, v in old.to_dict().items() if k != "diffusion"}
    validation.validate_config(cleaned, num_devices=1)


@pytest.mark.parametrize("override", SILENT_CASES)
def test_ablate_set_refuses_the_same_fields_before_any_cell_runs(override, tmp_path):
    grid = tmp_path / "grid.py"
    grid.write_text('def get_grid():\n    return {"base": "vdm:runlocal", "cells": {"a": {}, "b": {}}}\n')
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        ablate.run_grid(str(grid), str(out), extra=ablate.parse_set([override]), quality=False)
    field = override.partition("=")[0]
    assert str(e.value).startswith(f"grid cell 'a': config.{field}: method 'vdm' does not read config.diffusion")
    assert not out.exists()  # nothing written, nothing trained


def test_the_nan_guard_names_the_vaes_own_dtype():
    config = configuration.load_config_file("vae:runlocal")
    guard = NonfiniteGuard(2)
    guard.streak, guard.first_bad = 2, 3
    assert "config.vae.dtype='float32'" in guard.message(config, 4, "/tmp/x")


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["train.py", "--config.diffusion.schedule=cosinee"],
        [
            "-m",
            "ddpm_jax.ablation",
            "--grid=ddpm_vs_vae",
            "--set=diffusion.parameterization=x0",  # valid for the ddpm cell, unread by the vae cell
        ],
    ],
    ids=["train", "ablate"],
)
def test_one_error_line_before_any_compile(argv, tmp_path):
    """The whole command line: exit status 1, one line on stderr, and no workdir made."""
    out = tmp_path / "run"
    extra = [f"--workdir={out}"] if argv[0] == "train.py" else [f"--out={out}"]
    proc = subprocess.run([sys.executable, *argv, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not read config.diffusion" in errors[0], proc.stderr[-2000:]
    assert not out.exists()
