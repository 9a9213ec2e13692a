"""Configs by name (`--config=cifar10`, `vdm:runlocal`) or by path, their variants (the hardware ones
of cifar10 included), grids by name, and users' own config files; all in-process, no training."""

import importlib
import math
import os
import sys

import pytest

from ddpm_jax import configuration
from ddpm_jax.commands import ablate, cli
from ddpm_jax.configs import cifar10
from ddpm_jax.errors import ConfigError
from ddpm_jax.training.validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["cifar10", "ddpm", "hvae", "mnist", "vae", "vdm"]


def test_the_shipped_configs_are_the_files_of_configs():
    assert configuration.names() == SHIPPED
    assert configuration.configs_dir() == os.path.realpath(os.path.join(ROOT, "configs"))
    assert "schedules" in configuration.names("ablations") and "_common" not in configuration.names("ablations")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_name_loads_the_same_config_as_its_path(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    digests = {}
    for variant in ("", ":runlocal"):
        by_name = configuration.load_config_file(name + variant)
        by_path = configuration.load_config_file(f"configs/{name}.py{variant}")
        digests[variant] = configuration.digest(by_name)
        assert digests[variant] == configuration.digest(by_path)
    assert digests[""] != digests[":runlocal"]
    # the cross-imports resolve inside the shipped package, whatever the current directory
    monkeypatch.chdir(os.path.dirname(ROOT))
    assert configuration.digest(configuration.load_config_file(name)) == digests[""]


def test_names_give_what_the_files_say():
    assert configuration.load_config_file("vdm:runlocal").method == "vdm"
    assert configuration.load_config_file("cifar10").data.dataset == "cifar10"
    assert configuration.load_config_file("ddpm:runlocal").training.num_train_steps == 4


@pytest.mark.parametrize(
    "spec,pieces",
    [
        ("cifar", ["--config=cifar: no config named 'cifar'", "did you mean cifar10?", ", ".join(SHIPPED)]),
        ("configs/nope.py", ["--config=configs/nope.py: no such file", "configs/"]),
        ("vdm:runlcal", ["unknown variant 'runlcal' of vdm", "its variants are runlocal"]),
        ("cifar10:gpu9", ["unknown variant 'gpu9' of cifar10", "gpu8", "h200", "tpu-v4-32"]),
    ],
)
def test_bad_names_and_variants_list_the_known_ones(spec, pieces, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        configuration.load_config_file(spec)
    for piece in pieces:
        assert piece in str(info.value), str(info.value)


def test_cifar10_get_config_refuses_an_unknown_variant_itself():
    with pytest.raises(ValueError, match="its variants are runlocal, h100, h200, gpu8"):
        cifar10.get_config("h300")


@pytest.mark.parametrize("variant", list(cifar10.HARDWARE))
def test_hardware_variants_set_batch_dtype_and_steps(variant):
    devices, batch = cifar10.HARDWARE[variant]
    config = configuration.load_config_file(f"cifar10:{variant}")
    paper = configuration.load_config_file("cifar10")
    validate_config(config, num_devices=devices)  # the batch splits evenly over the variant's devices
    assert config.model.dtype == "bfloat16" and paper.model.dtype == "float32"
    assert config.training.batch_size == batch
    # the paper's 800k x 128 training images, whatever the batch
    assert config.training.batch_size * config.training.num_train_steps == 800_000 * 128
    scale = batch / 128
    assert config.optim.lr == pytest.approx(2e-4 * math.sqrt(scale))
    assert config.training.ema_decay ** (1 / scale) == pytest.approx(0.9999)
    # the model, data and diffusion are the paper's
    for section in ("data", "diffusion"):
        assert config[section] == paper[section]
    assert {k: v for k, v in config.model.items() if k != "dtype"} == {
        k: v for k, v in paper.model.items() if k != "dtype"
    }


def test_single_gpu_variants_are_the_papers_recipe_in_bfloat16():
    paper = configuration.load_config_file("cifar10")
    for variant in ("h100", "h200", "tpu-v3-8"):
        config = configuration.load_config_file(f"cifar10:{variant}")
        diff = {k: v for k, v in configuration.flatten(config).items() if configuration.flatten(paper)[k] != v}
        assert set(diff) <= {"config.model.dtype", "config.optim.flatten"}, (variant, diff)
    gpu8 = configuration.load_config_file("cifar10:gpu8")
    assert (gpu8.training.batch_size, gpu8.training.num_train_steps, gpu8.optim.warmup_steps) == (512, 200_000, 1250)
    assert gpu8.optim.lr == pytest.approx(4e-4) and gpu8.training.eval_every == 2500


def test_the_config_flag_takes_a_variant_and_overrides():
    config = cli.check_config_flags(["train.py", "--config=cifar10:h200", "--config.training.batch_size=64"], "vdm")
    assert config.model.dtype == "bfloat16" and config.training.num_train_steps == 800_000
    assert cli.check_config_flags(["train.py"], "vdm").method == "vdm"  # the default, by name
    with pytest.raises(ConfigError, match="unknown config field config.training.batch_sise"):
        cli.check_config_flags(["train.py", "--config=cifar10:h200", "--config.training.batch_sise=64"], "vdm")


def test_grids_by_name_and_by_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert ablate.load_grid("schedules") == ablate.load_grid("configs/ablations/schedules.py")
    grid = ablate.load_grid("ddpm_vs_vae")
    assert grid["base"] == "ddpm" and ablate.cell_config(grid, "vae").method == "vae"
    with pytest.raises(ConfigError, match="no grid named 'schedule'.*did you mean schedules"):
        ablate.load_grid("schedule")


def test_a_users_config_folder_with_relative_imports(tmp_path):
    """A config of the user's own, in a folder with an __init__.py, imports its siblings relatively;
    one in a plain folder imports the shipped configs as ddpm_jax.configs."""
    folder = tmp_path / "myconfigs"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "base.py").write_text(
        "from ddpm_jax.configs import ddpm\n\ndef get_config(arg=None):\n    return ddpm.get_config(arg)\n"
    )
    (folder / "wide.py").write_text(
        "from . import base\n\ndef get_config(arg=None):\n    c = base.get_config(arg)\n    c.model.ch = 48\n    return c\n"
    )
    config = configuration.load_config_file(f"{folder / 'wide.py'}:runlocal")
    assert config.model.ch == 48 and config.training.num_train_steps == 4
    plain = tmp_path / "plain.py"
    plain.write_text(
        "from ddpm_jax.configs import cifar10\n\ndef get_config():\n    return cifar10.get_config('h200')\n"
    )
    assert configuration.load_config_file(str(plain)).model.dtype == "bfloat16"


def test_configs_found_in_a_checkout_whose_install_does_not_map_them(monkeypatch):
    """An older editable install (or PYTHONPATH=.) has no ddpm_jax.configs: the configs/ folder beside
    ddpm_jax/ is registered under that name, so names and the configs' relative imports still work."""
    real_import = importlib.import_module

    def no_mapping(name, *args):
        if name == configuration.CONFIGS_PACKAGE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args)

    # Not a double import's clean-up: the fallback must load configs/ afresh (a cached
    # ddpm_jax.configs.mnist would pass the last assert without it), and monkeypatch puts the
    # installed package back at teardown (the fallback would otherwise replace it in sys.modules).
    for name in [m for m in sys.modules if m == "ddpm_jax.configs" or m.startswith("ddpm_jax.configs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(importlib, "import_module", no_mapping)
    package = configuration.configs_package()
    assert package.__name__ == "ddpm_jax.configs"
    assert os.path.realpath(package.__path__[0]) == os.path.realpath(os.path.join(ROOT, "configs"))
    monkeypatch.setattr(importlib, "import_module", real_import)
    assert configuration.load_config_file("mnist:runlocal").data.dataset == "mnist"


def test_every_cell_of_every_shipped_grid_loads_from_another_directory(tmp_path, monkeypatch):
    """The grids name their configs by name (not repo-relative paths), so `ddpm-ablate --grid=<name>`
    works from any directory, installed or not."""
    monkeypatch.chdir(tmp_path)
    for name in configuration.names("ablations"):
        grid = ablate.load_grid(name)
        for cell in grid["cells"]:
            assert ablate.cell_config(grid, cell).method in ("ddpm", "vae", "hvae", "vdm"), (name, cell)
