"""The run layer's structure, read from the source with ast (and, for what a module drags in at
import, from a fresh interpreter): which module may depend on which, so the layers stay apart.

- Only the entry points train a model: ddpm_jax.training.loop is imported by the train command
  (ddpm_jax.commands.train, which train.py wraps) and by the ablation runner (which trains its
  cells), by nothing else.
- ddpm_jax.training.checkpoint is a leaf of the run layer: it knows no model, method or training step.
- Loading and sampling a run (run, sample_lib, evaluate, plots) needs neither TensorFlow nor the
  input pipeline (ddpm_jax.data).
- What is specific to a method lives in its file in methods/ (and its networks in models/): no
  other module tests a method's name.
- The core (ddpm_jax/core) is pure math: it imports only the core, the standard library and
  numpy, jax, flax, chex and scipy.
- The package's folders are its layers, each a package listed in pyproject.toml, and its top level
  stays small.
"""

import ast
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ddpm_jax"
ENTRY_POINTS = ("train.py", "sample.py")


def _module_name(path: str) -> str:
    rel = os.path.splitext(os.path.relpath(path, ROOT))[0].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _package_files() -> dict[str, str]:
    """{module name: path} of every module of the package (packages by their __init__.py)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                out[_module_name(path)] = path
    return out


MODULES = _package_files()
FILES = {**MODULES, **{os.path.splitext(s)[0]: os.path.join(ROOT, s) for s in ENTRY_POINTS}}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def _import_nodes(tree: ast.AST, module_level: bool):
    """The import statements of a file: all of them, or only those that run when it is imported
    (not inside a function, not under `if TYPE_CHECKING:`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if module_level and (
                isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_type_checking(child)
            ):
                continue
            stack.append(child)


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def project_imports(name: str, module_level: bool = False) -> dict[str, bool]:
    """{module of the package: imported by name} for what the file `name` imports directly: the
    modules it names (True) and their parent packages, whose __init__ runs first (False)."""
    path = FILES[name]
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: dict[str, bool] = {}
    for node in _import_nodes(tree, module_level):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports a.b when b is a module, else reads the attribute b of a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            if target in MODULES:
                for module in _with_parents(target):
                    found[module] = found.get(module, False) or module == target
    found.pop(name, None)
    return found


def import_closure(name: str, module_level: bool = False) -> dict[str, str | None]:
    """{module: the module that first imported it} for everything `name` imports, transitively.

    module_level=False also follows imports inside functions, except those of a package reached
    only as the parent of a module (importing a.b runs a/__init__'s module level, nothing more).
    """
    parent: dict[str, str | None] = {name: None}
    queue = [(name, True)]
    while queue:
        current, named = queue.pop(0)
        for dep, dep_named in sorted(project_imports(current, module_level or not named).items()):
            if dep not in parent:
                parent[dep] = current
                queue.append((dep, dep_named))
    return parent


def _chain(closure: dict, target: str) -> str:
    chain = [target]
    while closure[chain[-1]] is not None:
        chain.append(closure[chain[-1]])
    return " -> ".join(reversed(chain))


# ----------------------------------------------------------------------------- (a) the training loop


def test_only_the_entry_points_import_the_training_loop():
    importers = sorted(name for name in FILES if project_imports(name).get("ddpm_jax.training.loop"))
    assert importers == ["ddpm_jax.commands.ablate", "ddpm_jax.commands.train"], importers  # train.py wraps the latter


# ----------------------------------------------------------------------------- (b) checkpoint is a leaf


def test_checkpoint_knows_no_model_method_or_training():
    closure = import_closure("ddpm_jax.training.checkpoint")  # lazy imports inside functions included
    forbidden = (
        "ddpm_jax.training.train_lib",
        "ddpm_jax.training.loop",
        "ddpm_jax.methods",
        "ddpm_jax.models",
        "ddpm_jax.training.validation",
    )
    bad = [_chain(closure, m) for m in closure if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, bad


# ----------------------------------------------------------------------------- (c) no TF to load a run

_PROBE = (
    "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
    "print('tensorflow' in sys.modules, 'ddpm_jax.data' in sys.modules)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "modules",
    [
        ("ddpm_jax.run", "ddpm_jax.evaluation.sample_lib", "ddpm_jax.evaluation.plots"),
        ("ddpm_jax.commands.evaluate",),
    ],
    ids=["run,sample_lib,plots", "evaluate"],
)
def test_loading_a_run_imports_neither_tensorflow_nor_the_input_pipeline(modules):
    """In a fresh interpreter (third-party packages may import TensorFlow too, which ast cannot see)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = [
        _chain(closure, "ddpm_jax.data")
        for closure in (import_closure(m, module_level=True) for m in modules)
        if "ddpm_jax.data" in closure
    ]
    assert proc.stdout.split() == ["False", "False"], (proc.stdout, why)


# ----------------------------------------------------------------------------- (d) method names


def _method_names() -> dict[str, str]:
    """{method name: its module}, from the `name = "..."` of the Method subclasses in methods/."""
    names = {}
    for module, path in MODULES.items():
        if not module.startswith("ddpm_jax.methods."):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (
                        isinstance(stmt, ast.Assign)
                        and [ast.unparse(t) for t in stmt.targets] == ["name"]
                        and isinstance(stmt.value, ast.Constant)
                        and isinstance(stmt.value.value, str)
                    ):
                        names[stmt.value.value] = module
    return names


def test_method_names_are_the_registry():
    from ddpm_jax import methods

    assert set(_method_names()) == set(methods.REGISTRY)


def _strings(node: ast.AST) -> set[str]:
    """The string constants of a comparison operand (or of the tuple / list / set it tests against)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {s for elt in node.elts for s in _strings(elt)}
    return set()


def method_tests(path: str, method_names: set[str]) -> list[str]:
    """`file:line: source` of every test of a method's identity in the file: a comparison or match
    against a method name, a schedule compared with "learned" (the learned-schedule variant of the
    DDPM, learned_schedule.LEARNED), and the old is_vae / is_learned_schedule helpers."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            strings = set().union(*map(_strings, operands))
            text = ast.unparse(node)
            hit = bool(strings & method_names) or (("learned" in strings or "LEARNED" in text) and "schedule" in text)
        elif isinstance(node, ast.MatchValue):
            hit = bool(_strings(node.value) & method_names)
        elif isinstance(node, (ast.Name, ast.Attribute, ast.FunctionDef)):
            ident = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
            hit = ident in ("is_vae", "is_learned_schedule")
        if hit:
            found.append(
                f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.get_source_segment(open(path).read(), node)}"
            )
    return found


def test_only_a_methods_own_file_tests_its_name():
    names = _method_names()
    exempt = set(names.values())  # methods/ddpm.py, methods/vae.py, ...
    scanned = {
        name: path for name, path in FILES.items() if name not in exempt and not name.startswith("ddpm_jax.models")
    }
    assert "ddpm_jax.methods" in scanned and "ddpm_jax.training.loop" in scanned and "train" in scanned
    found = [hit for path in scanned.values() for hit in method_tests(path, set(names))]
    assert not found, "\n".join(found)
    # The check itself finds such tests (in the method files, where they belong).
    assert any("LEARNED" in hit for hit in method_tests(MODULES["ddpm_jax.methods.ddpm"], set(names)))
    assert method_tests(MODULES["ddpm_jax.methods.vae"], set(names))  # `"vae" not in config`


# ----------------------------------------------------------------------------- (e) the core is pure math

CORE = "ddpm_jax.core"
# The third-party packages the core may import: arrays, autodiff, pytrees and shape checks, and
# scipy, which core/quality.py needs for the Fréchet distance's matrix square root
# (scipy.linalg.sqrtm, in float64 on the host, as pytorch-fid computes it) and the Inception-style
# score's KL terms (scipy.special.xlogy). Anything else (the standard library aside) is not math.
CORE_THIRD_PARTY = {"numpy", "jax", "flax", "chex", "scipy"}


def _third_party_roots(name: str) -> set[str]:
    """The top-level names of every absolute import outside the package in the file `name` (imports
    inside functions and under TYPE_CHECKING included), the standard library left out."""
    path = FILES[name]
    roots = set()
    for node in _import_nodes(ast.parse(open(path).read(), path), module_level=False):
        if isinstance(node, ast.Import):
            roots |= {alias.name.partition(".")[0] for alias in node.names}
        elif not node.level:
            roots.add(node.module.partition(".")[0])
    return {r for r in roots if r != PACKAGE and r not in sys.stdlib_module_names}


def test_the_core_imports_only_the_core_and_the_math_libraries():
    core = sorted(m for m in MODULES if m == CORE or m.startswith(CORE + "."))
    assert "ddpm_jax.core.diffusion" in core and "ddpm_jax.core.quality" in core, core
    outside = {
        (name, dep)
        for name in core
        for dep, named in project_imports(name).items()  # parents (ddpm_jax/__init__) are not named
        if named and not (dep == CORE or dep.startswith(CORE + "."))
    }
    assert not outside, sorted(outside)
    third_party = {name: sorted(_third_party_roots(name) - CORE_THIRD_PARTY) for name in core}
    assert not any(third_party.values()), {k: v for k, v in third_party.items() if v}
    # The check itself sees a core module's imports.
    assert _third_party_roots("ddpm_jax.core.quality") == {"numpy", "scipy"}


# ----------------------------------------------------------------------------- (f) the package's shape

SUBPACKAGES = ("core", "models", "methods", "training", "evaluation", "data", "commands")
MAX_TOP_LEVEL_MODULES = 10


def test_the_top_level_holds_few_modules():
    top = sorted(f for f in os.listdir(os.path.join(ROOT, PACKAGE)) if f.endswith(".py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of ddpm_jax/: {top}"


def test_each_layer_is_a_package_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    for sub in SUBPACKAGES:
        assert os.path.isfile(os.path.join(ROOT, PACKAGE, sub, "__init__.py")), f"ddpm_jax/{sub}/ is not a package"
        assert f"{PACKAGE}.{sub}" in listed, f"{PACKAGE}.{sub} is missing from [tool.setuptools] packages"
    # and every package of the source tree is listed (the configs/ folder ships as ddpm_jax.configs)
    packages = {m for m, path in MODULES.items() if path.endswith("__init__.py")}
    for folder, dirnames, files in os.walk(os.path.join(ROOT, "configs")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in files:
            rel = os.path.relpath(folder, os.path.join(ROOT, "configs"))
            packages.add("ddpm_jax.configs" + ("" if rel == "." else "." + rel.replace(os.sep, ".")))
    assert packages == listed, (sorted(packages - listed), sorted(listed - packages))
