"""Ablation runner: a grid of override sets -> one workdir per cell -> one results table and plots.

    ddpm-ablate --grid=schedules [--out=runs/ablations] [--set=field=value]
    (or python -m ddpm_jax.ablation --grid=configs/ablations/schedules.py: a grid by name or by path)

A grid file defines `get_grid()` returning
    {"base": "ddpm",                       # config of every cell, a name or a file (a cell may name another: "config")
     "overrides": {"training.num_train_steps": 1200},      # applied to every cell
     "cells": {"linear": {"diffusion.schedule": "linear"}, "cosine": {...}}}

Each cell trains with ddpm_jax's loop into <out>/cells/<cell>/ (checkpoints, metrics, samples, its
test bound), then its sample quality is scored (ddpm_jax.commands.evaluate) and the row is written to
<out>/cells/<cell>/cell.json. A cell with that file is skipped, so an interrupted sweep resumes
where it stopped (an unfinished cell resumes from its checkpoint), and grids that share a cell
(every grid's "default") run it once. At the end: <out>/<grid>/results.md and results.csv (bits/dim
and its parts, Fréchet distance beside its train-vs-test floor, classifier score, wall time), beside
the independent-pixel histogram baseline, and <out>/<grid>/{bpd,loss}_vs_step.png.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time

import ml_collections
import numpy as np
from absl import flags

from ddpm_jax import configuration, fileio
from ddpm_jax.commands import cli
from ddpm_jax.configuration import load_config_file
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import plots

CELL_FILE = "cell.json"
COLUMNS = (
    "cell",
    "total_bpd",
    "total_bpd_se",
    "decoder_bpd",
    "diffusion_bpd",
    "prior_bpd",
    "recon_bpd",
    "kl_bpd",
    "fd",
    "fd_floor",
    "classifier_score",
    "final_train_loss",
    "steps",
    "train_time_s",
    "overrides",
)


def load_grid(path: str) -> dict:
    """The grid file's dict (a shipped grid by name, e.g. `schedules`, or a path), checked: a base config,
    common overrides and at least one cell."""
    path = configuration.resolve(path, flag="--grid", subfolder="ablations")
    try:
        grid = configuration.import_file(path).get_grid()
    except Exception as e:  # noqa: BLE001 - the user's grid file
        raise ConfigError(f"--grid={path}: loading it failed ({type(e).__name__}: {e}).") from e
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), dict) or not grid["cells"]:
        raise ConfigError(
            f"--grid={path}: get_grid() must return a dict with a non-empty 'cells' dict "
            "(cell name -> {dotted config field: value})."
        )
    for name in grid["cells"]:
        if not name or os.sep in name or name.startswith("."):
            raise ConfigError(f"--grid={path}: cell name {name!r} must be a plain folder name.")
    return grid


def cell_config(grid: dict, name: str, extra: dict | None = None) -> ml_collections.ConfigDict:
    """The base config with the common, the cell's and the extra overrides applied (each field must exist)."""
    from ddpm_jax.training.validation import unread_field_error  # the methods: imported only when used

    overrides = {**grid.get("overrides", {}), **grid["cells"][name], **(extra or {})}
    config = load_config_file(overrides.pop("config", grid.get("base", "ddpm")))
    for dotted, value in overrides.items():
        try:
            error = unread_field_error(config, dotted, fields=False)  # a field the cell's method would silently ignore
            if error is not None:
                raise error
            configuration.set_field(config, dotted, value)
        except ConfigError as e:
            raise ConfigError(f"grid cell {name!r}: {e}") from None
    return config


def run_cell(
    grid: dict,
    name: str,
    cells_dir: str,
    *,
    extra: dict | None = None,
    quality: bool = True,
    num_samples: int = 500,
    sampler: str = "respaced",
    num_steps: int = 100,
) -> dict | None:
    """Trains and scores one cell in <cells_dir>/<name> (or reads its finished row); None when pre-empted.

    A cell folder belongs to one config: the same name with another config is an error, not a reuse.
    """
    from ddpm_jax.commands import evaluate
    from ddpm_jax.training import checkpoint, loop

    config = cell_config(grid, name, extra)
    digest = configuration.digest(config)
    workdir = os.fspath(fileio.as_path(cells_dir) / name)
    done = fileio.as_path(workdir) / CELL_FILE
    saved = checkpoint.load_config(workdir, required=False) if fileio.as_path(workdir).is_dir() else None
    if saved is not None and configuration.digest(saved) != digest:
        raise ConfigError(
            f"cell {name!r}: {workdir} holds a run of another config (another grid, or the grid or "
            "--set changed). Give the cell another name, or delete that folder to rerun it."
        )
    if done.exists():
        return json.loads(done.read_text())
    start = time.time()
    results = loop.train_and_evaluate(config, workdir)
    if "stopped_at" in results:
        return None
    row = {
        "cell": name,
        "steps": results["step"],
        "train_time_s": round(time.time() - start, 1),
        "overrides": json.dumps(grid["cells"][name], sort_keys=True),
        "config_digest": digest,
    }
    row.update({k: v for k, v in results.items() if k.endswith("_bpd") or k == "total_bpd_se"})
    records = [r for r in fileio.read_jsonl(fileio.as_path(workdir) / "metrics.jsonl") if "loss" in r]
    if records:
        row["final_train_loss"] = records[-1]["loss"]
    if quality:
        scored = evaluate.evaluate_workdir(
            workdir, bpd=False, quality=True, num_samples=num_samples, sampler=sampler, num_steps=num_steps
        )
        row.update(
            {
                k: scored[k]
                for k in ("fd", "fd_floor", "classifier_score", "classifier_score_test", "sampler")
                if k in scored
            }
        )
    fileio.atomic_write_json(done, row)
    return row


def histogram_row(config: ml_collections.ConfigDict) -> dict:
    """The independent-pixel histogram baseline's row (digits: fitted on train, scored on test)."""
    from ddpm_jax.core import baselines
    from ddpm_jax.data import splits

    bpd = baselines.pixel_histogram_bpd(
        splits.load_split(config, config.data.train_split), splits.load_split(config, config.data.eval_split)
    )
    return {"cell": "baseline: pixel histogram", "total_bpd": bpd, "overrides": "independent per-pixel categorical"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_tables(rows: list[dict], out: str) -> tuple[str, str]:
    """results.csv (every column) and results.md (the columns that hold a value)."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    csv_path, md_path = os.fspath(fileio.as_path(out) / "results.csv"), os.fspath(fileio.as_path(out) / "results.md")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    fileio.atomic_write(csv_path, table.getvalue())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    fileio.atomic_write(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def plot_vs_step(
    cells: list[str], cells_dir: str, path: str, key: str, ylabel: str, title: str, final_key: str | None = None
) -> str | None:
    """metrics.jsonl's `key` against step, one curve per cell (log y); `final_key`'s last value, if
    given, as a marker at its step. Returns the path, or None when no cell has the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for name in cells:
        records = fileio.read_jsonl(fileio.as_path(cells_dir) / name / "metrics.jsonl")
        pts = [(r["step"], r[key]) for r in records if np.isfinite(r.get(key, np.nan))]
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts), label=name)
        final = [(r["step"], r[final_key]) for r in records if final_key in r] if final_key else []
        if final:
            ax.plot(*final[-1], "o", color=line.get_color())
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def plot_grid_curves(cells: list[str], cells_dir: str, out: str) -> list[str]:
    """<out>/bpd_vs_step.png (the test bound) and <out>/loss_vs_step.png (the train loss)."""
    made = [
        plot_vs_step(
            cells,
            cells_dir,
            fileio.as_path(out) / "bpd_vs_step.png",
            "test_bpd_est",
            "test bound [bits/dim]",
            "test bound: lines, 20-strata estimate at each eval; dots, the final bound",
            final_key="test_total_bpd",
        ),
        plot_vs_step(
            cells,
            cells_dir,
            fileio.as_path(out) / "loss_vs_step.png",
            "loss",
            "train loss (the logged step's batch)",
            "train loss at each log step",
        ),
    ]
    return [p for p in made if p]


def run_grid(
    grid_path: str, out: str, *, extra: dict | None = None, only: list[str] | None = None, **cell_kwargs
) -> list[dict] | None:
    """Runs (or resumes) every cell of the grid in <out>/cells/<cell>, then writes the tables and the
    plot to <out>/<grid name>/; returns the rows, or None when pre-empted (run the same command again)."""
    from ddpm_jax.training.validation import validate_config

    grid = load_grid(grid_path)
    names = list(grid["cells"])
    if only:
        unknown = [n for n in only if n not in grid["cells"]]
        if unknown:
            raise ConfigError(f"--only: {unknown} not in the grid; its cells are {', '.join(names)}.")
        names = [n for n in names if n in only]
    for name in names:  # every cell's config is checked before the first one trains
        config = cell_config(grid, name, extra)  # names the cell in its own errors
        try:
            validate_config(config)
        except ConfigError as e:
            raise ConfigError(f"grid cell {name!r}: {e}") from None
    cells_dir = os.fspath(fileio.as_path(out) / "cells")
    tables_dir = os.fspath(fileio.as_path(out) / os.path.splitext(os.path.basename(grid_path))[0])
    fileio.as_path(tables_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] cell {name}", flush=True)
        row = run_cell(grid, name, cells_dir, extra=extra, **cell_kwargs)
        if row is None:
            print(f"Pre-empted in cell {name}: run the same command again to resume.", flush=True)
            return None
        rows.append(row)
    base = cell_config(grid, names[0], extra)
    if base.data.dataset == "digits":
        rows.append(histogram_row(base))
    csv_path, md_path = write_tables(rows, tables_dir)
    curves = plot_grid_curves(names, cells_dir, tables_dir)
    print(fileio.read_text(md_path))
    print("wrote " + ", ".join([md_path, csv_path, *curves]))
    return rows


def parse_set(items: list[str]) -> dict:
    import ast

    extra = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set={item}: write field=value, e.g. --set=training.num_train_steps=600.")
        try:
            extra[field] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            extra[field] = text  # a bare string such as cosine
    return extra


def cli_main() -> None:
    """The command line (flags are defined here, not at import, so the library imports cleanly)."""
    _GRID = flags.DEFINE_string(
        "grid", None, "A grid: a name of configs/ablations/ (e.g. schedules) or a path to a grid file."
    )
    _OUT = flags.DEFINE_string(
        "out",
        "runs/ablations",
        "Root of the sweeps: <out>/cells/<cell> (one workdir per "
        "cell, shared by the grids) and <out>/<grid>/results.md.",
    )
    _ONLY = flags.DEFINE_list("only", None, "Run only these cells (comma-separated names).")
    _SET = flags.DEFINE_multi_string(
        "set",
        [],
        "Extra override for every cell, field=value (a Python literal), e.g. --set=training.num_train_steps=600.",
    )
    _QUALITY = flags.DEFINE_bool("quality", True, "Score sample quality (Fréchet distance) for every cell.")
    _NUM = flags.DEFINE_integer("num_samples", 500, "Samples per cell for the Fréchet distance.", lower_bound=2)

    def main(argv):
        if not _GRID.value:
            raise ConfigError(
                f"--grid is required, e.g. --grid=schedules; the grids: {', '.join(configuration.names('ablations'))}."
            )
        from ddpm_jax.data import pipeline

        pipeline.hide_gpus_from_tf()  # tf.data stays on the CPU, the accelerators' memory to JAX
        run_grid(
            _GRID.value,
            _OUT.value,
            extra=parse_set(_SET.value),
            only=_ONLY.value,
            quality=_QUALITY.value,
            num_samples=_NUM.value,
        )

    cli.run(main)


if __name__ == "__main__":
    cli_main()
