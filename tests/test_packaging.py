"""The wheel: what it holds, and its console commands run from a fresh venv outside the repo.

The wheel is built from a copy of the sources (no build/ or egg-info left in the repo) without build
isolation, and installed with --no-deps into a fresh venv whose dependencies come from this venv's
site-packages through a .pth line (a plain path: this venv's own .pth files, the editable install's
among them, are not run). So nothing is downloaded, and ddpm_jax and its configs can only come from
the wheel.
"""

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

from helpers import fault_utils as fu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("ddpm-train", "ddpm-sample", "ddpm-evaluate", "ddpm-ablate")


def _sources_in(folder: str, prefix: str) -> set[str]:
    """The .py files under folder, as paths in the wheel under prefix."""
    out = set()
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), folder)
                out.add(f"{prefix}/{rel}".replace(os.sep, "/"))
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ("ddpm_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = dist.glob("ddpm_jax-*.whl")
    return str(path)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> str:
    """A fresh venv with the wheel installed (no pip of its own: this venv's pip installs into it)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = str(root / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site, "_deps_from_test_venv.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(root)


def test_the_wheel_holds_every_module_config_grid_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    expected = _sources_in(os.path.join(ROOT, "ddpm_jax"), "ddpm_jax") | _sources_in(
        os.path.join(ROOT, "configs"), "ddpm_jax/configs"
    )
    assert expected - names == set(), "pyproject.toml's [tool.setuptools] packages misses these"
    assert not any(n.startswith(("configs/", "tests/", "bench/")) for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names) and "License-Expression: Apache-2.0" in metadata
    for script in SCRIPTS:
        assert f"{script} = " in entry_points
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert {"gpu", "gpu-cuda12", "tpu"} <= set(extras)


def test_the_pre_commit_ruff_is_the_pinned_ruff():
    """.pre-commit-config.yaml's ruff hooks run the ruff that .ci/run checks with (the test extra's pin)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        test_extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    (pin,) = [r.partition("==")[2] for r in test_extra if r.startswith("ruff==")]
    with open(os.path.join(ROOT, ".pre-commit-config.yaml")) as f:
        hook = re.search(r"repo: https://github\.com/astral-sh/ruff-pre-commit\s+rev: v(\S+)", f.read())
    assert hook and hook.group(1) == pin, (hook and hook.group(1), pin)


# TensorFlow and what only it brings: in the `tf` extra alone (tensorflow-datasets and TensorBoard, which
# the tests' event-file reader uses, are not TensorFlow).
TENSORFLOW = {"tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tf-nightly", "keras"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_the_default_install_and_every_extra_but_tf_pull_no_tensorflow(wheel):
    """The wheel's own Requires-Dist: nothing outside the `tf` extra names TensorFlow, and `tf` does."""
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    by_extra: dict[str, set[str]] = {}
    for line in re.findall(r"^Requires-Dist: (.*)$", metadata, flags=re.M):
        requirement = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(requirement.marker or ""))
        by_extra.setdefault(extra.group(1) if extra else "", set()).add(_name(line))
    assert {"", "tf", "gpu", "gpu-cuda12", "gpu-local", "tpu", "test"} <= set(by_extra), sorted(by_extra)
    for extra, names in by_extra.items():
        if extra != "tf":
            assert names & TENSORFLOW == set(), (extra, names & TENSORFLOW)
    assert by_extra["tf"] == {"tensorflow-cpu", "tensorflow"}


class _Imports(ast.NodeVisitor):
    """Top-level module names imported, split by whether the import runs when the module is imported."""

    def __init__(self):
        self.at_import, self.in_functions, self._depth = set(), set(), 0

    def _add(self, name: str):
        (self.in_functions if self._depth else self.at_import).add(name.split(".")[0])

    def visit_FunctionDef(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:
            self._add(node.module)


def test_each_third_party_import_is_a_declared_dependency():
    """What ddpm_jax imports when a module loads comes from [project.dependencies]; what it imports only
    inside a function (TensorFlow for TFRecord-only datasets, ...) from there or an extra. A module name
    is mapped to its distribution through this venv's installed metadata, or, where it is not installed
    (TensorFlow in the default install), taken as the distribution's name."""
    project = _project()
    default = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    dists = {m: {re.sub(r"[-_.]+", "-", d).lower() for d in ds} for m, ds in md.packages_distributions().items()}
    imports = _Imports()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ddpm_jax")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    imports.visit(ast.parse(f.read()))
    third_party = lambda names: {n for n in names if n not in sys.stdlib_module_names and n != "ddpm_jax"}
    dist = lambda module: dists.get(module, {re.sub(r"[-_.]+", "-", module).lower()})
    for module in third_party(imports.at_import):
        assert dist(module) & default, f"{module} ({dist(module)}) is imported at load time but not a dependency"
    for module in third_party(imports.in_functions):
        assert dist(module) & (default | extras), f"{module} ({dist(module)}) is not declared"
    assert "tensorflow" not in imports.at_import


def test_constraints_pin_each_dependency_inside_its_bounds():
    """constraints.txt (the tested versions) pins every requirement of the default install and of the
    extras CI installs (test, fid-reference, and tf: the tfrecord path's tests need TensorFlow), each
    inside pyproject.toml's bounds. The default install's freedom from TensorFlow is the wheel test above
    and tests/test_no_tensorflow.py."""
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(
            (re.sub(r"[-_.]+", "-", name).lower(), version)
            for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", f.read(), flags=re.M)
        )
    project = _project()
    opt = project["optional-dependencies"]
    for line in project["dependencies"] + opt["test"] + opt["fid-reference"] + opt["tf"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pins.get(_name(line))
        assert version is not None, f"constraints.txt pins no {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), (line, version)


@pytest.mark.slow
def test_installed_commands_train_from_outside_the_repo(venv, data_dir, tmp_path, tmp_path_factory):
    """ddpm-train from the wheel, in a folder outside the repo, with a config chosen by name: it loads
    the configs of the installed package (not the repo's), trains 2 steps and writes its workdir."""
    env = fu.env(str(tmp_path_factory.getbasetemp()), data_dir, devices=1)
    env.pop("PYTHONPATH", None)
    bin_dir = os.path.join(venv, "bin")
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*args, timeout=300):
        return subprocess.run(list(args), cwd=outside, env=env, capture_output=True, text=True, timeout=timeout)

    probe = (
        "import importlib.metadata as md, ddpm_jax; from ddpm_jax import configuration; "
        "print(ddpm_jax.__file__, configuration.configs_dir()); "
        "print(sorted(e.name for e in md.entry_points(group='console_scripts') if e.name.startswith('ddpm-') and e.load()))"
    )
    where = run(os.path.join(bin_dir, "python"), "-c", probe)  # every command's entry point imports
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, configs_dir, *scripts = where.stdout.strip().split(maxsplit=2)
    assert package_file.startswith(venv) and configs_dir.startswith(venv), where.stdout
    assert configs_dir.endswith(os.path.join("ddpm_jax", "configs"))
    assert scripts == [str(sorted(SCRIPTS))]
    help_ = run(os.path.join(bin_dir, "ddpm-train"), "--help")  # absl's --help exits with status 1
    assert "--config: A config by name (cifar10, ddpm, hvae, mnist, vae, vdm)" in help_.stdout, help_.stderr[-2000:]
    bad = run(os.path.join(bin_dir, "ddpm-train"), "--config=cifar10:gpu9")
    assert bad.returncode == 1 and "its variants are runlocal, h100, h200, gpu8" in bad.stderr, bad.stderr[-2000:]

    workdir = outside / "run"
    proc = run(
        os.path.join(bin_dir, "ddpm-train"),
        "--config=ddpm:runlocal",
        f"--workdir={workdir}",
        "--config.training.num_train_steps=2",
        "--config.training.final_bpd=False",
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["training"]["num_train_steps"] == 2 and saved["model"]["ch"] == 8  # ddpm:runlocal's
