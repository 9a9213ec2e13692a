"""Ablation runner: a grid of override sets x seeds -> one workdir per run -> one results table and plots.

    ddpm-ablate --grid=schedules [--seeds=3] [--only=default,cosine] [--out=runs/ablations] [--set=field=value]
    (or python -m ddpm_jax.ablation --grid=configs/ablations/schedules.py: a grid by name or by path)

A grid file defines `get_grid()` returning
    {"base": "ddpm",                       # config of every cell, a name or a file (a cell may name another: "config")
     "overrides": {"training.num_train_steps": 1200},      # applied to every cell
     "cells": {"linear": {"diffusion.schedule": "linear"}, "cosine": {...}},
     "reference": "linear",                # optional: the cell the others are compared with ("default", else the first)
     "seeds": 1}                           # optional: seeds per cell (--seeds overrides it)

Seeds. Seed k of a cell trains with config.seed = (the cell's seed) + k, which changes its init, its
data order and its noise draws (the test images stay the same), into <out>/cells/<cell> for k = 0
(today's single-seed folders stay valid) and <out>/cells/<cell>@seed<k> for k >= 1. Runs go seed
by seed (every cell's seed 0, then every cell's seed 1, ...), so a sweep cut short still has whole
seeds. The plan (cells x seeds) is printed first, and after every run it trains an estimate of the
time left.

Each run trains with ddpm_jax's loop (checkpoints, metrics, samples, its test bound and the bound of
every test image, bound_per_image.npz), then its sample quality is scored (ddpm_jax.commands.evaluate,
sampling key k) and the row is written to <run>/cell.json. A run with that file is skipped, so an
interrupted sweep resumes where it stopped (an unfinished run resumes from its checkpoint), and grids
that share a cell (every grid's "default") run it once.

At the end, in <out>/<grid>/: results.md and results.csv, one row per cell: each metric's mean
and standard error over the cell's seeds and, for bits/dim, the Frechet distance and the classifier
score, the difference from the reference cell paired by seed (and for the bound by test image, with
the same t and eps draws per image within a seed), its 95% interval and a verdict: better, worse or
within noise (ddpm_jax.evaluation.paired says how the interval is made); results_by_seed.csv, every
run's row; the independent-pixel histogram baseline; {bpd,loss}_vs_step.png, the mean over seeds with
a min-max band.

Splits: every choice is made on the validation split (data.splits: by default a fixed tenth of the train
split held out), every reported number is measured on the test split. Each run's final report uses the
EMA params of its best validation eval (training.keep_best; its `selected_step`), the samples scored for
the Frechet distance are drawn from those params, and the table's best cell (`best_by_val`) is the one with
the lowest validation bound (val_total_bpd, the same bound as the test one, on the validation images).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import numbers
import os
import time

import ml_collections
import numpy as np
from absl import flags

from ddpm_jax import configuration, fileio
from ddpm_jax.commands import cli
from ddpm_jax.configuration import load_config_file
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import paired, plots

CELL_FILE = "cell.json"
SEED_MARK = "@seed"  # <cell>@seed<k>: seed k >= 1 of a cell ("@" is refused in cell names)
SPLIT = "test"  # every number the tables measure: the bound, the Frechet distance's reference, FID
CHOSEN_ON = "validation"  # every choice: each run's checkpoint (keep_best) and the best cell (val_total_bpd)
BEST_BY = "val_total_bpd"  # the column the best cell has the lowest mean of
# The metrics compared with the reference cell -> lower is better.
COMPARED = {"total_bpd": True, "fd": True, "classifier_score": False, "fid": True}
# The per-run numbers averaged over seeds (mean, and for these the standard error: COMPARED).
AVERAGED = (
    "total_bpd",
    "decoder_bpd",
    "diffusion_bpd",
    "prior_bpd",
    "recon_bpd",
    "kl_bpd",
    "fd",
    "fd_floor",
    "classifier_score",
    "fid",  # with the FID Inception weights only (ddpm_jax.fid), against the test split
    "inception_score",
    "kid",
    "final_train_loss",
    "val_total_bpd",  # the selected params' bound on the validation split: what the best cell is chosen by
    "train_time_s",
)


# evaluate_workdir's numbers a run's row keeps (fid, inception_score and kid with the FID Inception weights only).
SCORES = ("fd", "fd_floor", "classifier_score", "classifier_score_test", "sampler", "fid", "inception_score", "kid")


def _compared(metric: str) -> tuple[str, ...]:
    return (f"{metric}_diff", f"{metric}_diff_lo", f"{metric}_diff_hi", f"{metric}_verdict", f"{metric}_interval")


def _with_comparisons(metrics):
    """Each metric, followed, for the COMPARED ones, by its standard error and its comparison columns."""
    for metric in metrics:
        yield metric
        if metric in COMPARED:
            yield from (f"{metric}_se", *_compared(metric))


COLUMNS = (  # results.csv: one row per cell
    "cell",
    *_with_comparisons(m for m in AVERAGED if m not in ("train_time_s", "val_total_bpd")),
    *("steps", "train_time_s", "seeds", "se_over", "split", "num_examples", "overrides"),
    *("val_total_bpd", "val_total_bpd_se", "val_num_examples", "best_by_val", "chosen_on", "selected_steps"),
)
RUN_COLUMNS = (  # results_by_seed.csv: one row per run
    *("cell", "seed_index", "seed", "run", "total_bpd_se"),
    *AVERAGED,
    *("steps", "num_examples", "overrides"),
    *("val_total_bpd_se", "val_num_examples", "selected_step", "selected_by", "selected_value"),
)
RUN_SELECTION = ("val_total_bpd_se", "val_num_examples", "selected_step", "selected_by", "selected_value")


def load_grid(path: str) -> dict:
    """The grid file's dict (a shipped grid by name, e.g. `schedules`, or a path), checked: a base config,
    common overrides, at least one cell, a reference among the cells and a whole number of seeds."""
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
        if not name or os.sep in name or name.startswith(".") or "@" in name:
            raise ConfigError(
                f"--grid={path}: cell name {name!r} must be a plain folder name without '@' "
                f"(<cell>{SEED_MARK}<k> is the folder of its seed k)."
            )
    if grid.get("reference") is not None and grid["reference"] not in grid["cells"]:
        raise ConfigError(
            f"--grid={path}: reference {grid['reference']!r} is not one of its cells {list(grid['cells'])}."
        )
    seeds = grid.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--grid={path}: seeds must be a whole number >= 1, got {seeds!r}.")
    return grid


def reference_cell(grid: dict) -> str:
    """The cell the others are compared with: the grid's "reference", else "default", else the first."""
    if grid.get("reference") is not None:
        return grid["reference"]
    return "default" if "default" in grid["cells"] else next(iter(grid["cells"]))


def run_name(cell: str, seed_index: int = 0) -> str:
    """The folder of a cell's seed: <cell> for seed 0 (the single-seed folders), <cell>@seed<k> after."""
    return cell if seed_index == 0 else f"{cell}{SEED_MARK}{seed_index}"


def cell_config(grid: dict, name: str, extra: dict | None = None, seed_index: int = 0) -> ml_collections.ConfigDict:
    """The base config with the common, the cell's and the extra overrides applied (each field must exist);
    seed k adds k to config.seed (the init, the data order and every noise draw; not the test images)."""
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
    if seed_index:
        config.seed = int(config.seed) + seed_index
    return config


def run_cell(
    grid: dict,
    name: str,
    cells_dir: str,
    *,
    seed_index: int = 0,
    extra: dict | None = None,
    quality: bool = True,
    num_samples: int = 500,
    sampler: str = "respaced",
    num_steps: int = 100,
    inception_weights: str | None = None,
) -> dict | None:
    """Trains and scores seed `seed_index` of one cell in <cells_dir>/<run_name> (or reads its finished
    row); None when pre-empted. Its samples for the Frechet distance are drawn with key seed_index, from the
    params its final report used (the best validation eval's with keep_best);
    with inception_weights (a file) also FID, IS and KID of num_samples samples against the test split.

    A run folder belongs to one config: the same name with another config is an error, not a reuse.
    """
    from ddpm_jax.commands import evaluate
    from ddpm_jax.training import checkpoint, loop, metric_writer

    config = cell_config(grid, name, extra, seed_index)
    digest = configuration.digest(config)
    folder = run_name(name, seed_index)
    workdir = os.fspath(fileio.as_path(cells_dir) / folder)
    done = fileio.as_path(workdir) / CELL_FILE
    saved = checkpoint.load_config(workdir, required=False) if fileio.as_path(workdir).is_dir() else None
    if saved is not None and configuration.digest(saved) != digest:
        raise ConfigError(
            f"cell {name!r} (seed {seed_index}): {workdir} holds a run of another config (another grid, or the "
            "grid or --set changed). Give the cell another name, or delete that folder to rerun it."
        )
    identity = {"cell": name, "seed_index": seed_index, "seed": int(config.seed), "run": folder}
    if done.exists():
        row = json.loads(done.read_text())
        return {**identity, **row} if "seed_index" not in row else row  # rows of single-seed sweeps lack these
    start = time.time()
    results = loop.train_and_evaluate(config, workdir)
    if "stopped_at" in results:
        return None
    row = {
        **identity,
        "steps": results["step"],
        "train_time_s": round(time.time() - start, 1),
        "overrides": json.dumps(grid["cells"][name], sort_keys=True),
        "config_digest": digest,
    }
    row.update({k: v for k, v in results.items() if k.endswith("_bpd") or k in ("total_bpd_se", "num_examples")})
    row.update({k: results[k] for k in RUN_SELECTION if k in results})
    records = [r for r in metric_writer.read_metrics(workdir) if "loss" in r]
    if records:
        row["final_train_loss"] = records[-1]["loss"]
    if quality:
        fid_args = {}
        if inception_weights is not None:  # FID, IS and KID against the test split, with the fd's sampler
            from ddpm_jax.evaluation.fid import split_reference

            reference = split_reference(config, config.data.eval_split)
            fid_args = dict(fid=True, fid_reference=reference, inception_weights=inception_weights, fid_sampler=sampler)
        scored = evaluate.evaluate_workdir(
            workdir,
            params="best" if results.get("selected_by") in loop.SELECT_BY else "ema",  # the report's params
            bpd=False,
            quality=True,
            num_samples=num_samples,
            sampler=sampler,
            num_steps=num_steps,
            seed=seed_index,
            **fid_args,
        )
        row.update({k: scored[k] for k in SCORES if k in scored})
    fileio.atomic_write_json(done, row)
    return row


def finished_row(grid: dict, name: str, cells_dir: str, seed_index: int, extra: dict | None = None) -> dict | None:
    """A finished run's row if its folder holds one of this config (nothing is trained), else None."""
    done = fileio.as_path(cells_dir) / run_name(name, seed_index) / CELL_FILE
    if not done.exists():
        return None
    row = json.loads(done.read_text())
    if row.get("config_digest") != configuration.digest(cell_config(grid, name, extra, seed_index)):
        return None
    return {"cell": name, "seed_index": seed_index, "run": run_name(name, seed_index), **row}


def per_image_bound(cells_dir: str, folder: str) -> np.ndarray | None:
    """The run's final bound of every test image (bound_per_image.npz), or None (runs before it existed)."""
    from ddpm_jax.evaluation.report import BOUND_PER_IMAGE

    path = fileio.as_path(cells_dir) / folder / BOUND_PER_IMAGE
    return np.asarray(fileio.load_npz(path)["total_bpd"], np.float64) if path.exists() else None


def histogram_row(config: ml_collections.ConfigDict) -> dict:
    """The independent-pixel histogram baseline's row (digits: fitted on the training set the models see,
    data.splits.load_train, and scored on test)."""
    from ddpm_jax.core import baselines
    from ddpm_jax.data import splits

    bpd = baselines.pixel_histogram_bpd(splits.load_train(config), splits.load_split(config, config.data.eval_split))
    return {"cell": "baseline: pixel histogram", "total_bpd": bpd, "overrides": "independent per-pixel categorical"}


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _values(by_seed: dict[int, dict], metric: str) -> dict[int, float]:
    return {s: r[metric] for s, r in by_seed.items() if _finite(r.get(metric))}


def summarize(
    cells: list[str],
    reference: str,
    runs: dict[str, dict[int, dict]],
    per_image: dict[str, dict[int, np.ndarray]] | None = None,
) -> list[dict]:
    """One row per cell with finished runs: each AVERAGED metric's mean over its seeds (the COMPARED
    ones with their standard error over seeds, `<metric>_se`; with one seed total_bpd_se stays the
    bound's standard error over test images, `se_over` says which), and for every COMPARED metric the
    difference from the reference paired by seed index (the bound also by test image, from
    `per_image`), its 95% interval, the interval's method and the verdict (evaluation.paired).

    Args:
      cells: the table's cells, in order. reference: the cell compared with.
      runs: cell -> seed index -> the run's row (cell.json). per_image: cell -> seed index -> [M].
    """
    per_image = per_image or {}
    ref_runs = runs.get(reference, {})
    table = []
    for name in cells:
        by_seed = runs.get(name) or {}
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        row = {"cell": name, "seeds": len(seeds), "split": SPLIT, "chosen_on": CHOSEN_ON}
        row.update({k: first[k] for k in ("steps", "num_examples", "overrides", "val_num_examples") if k in first})
        if any("selected_step" in by_seed[s] for s in seeds):
            row["selected_steps"] = "/".join(str(by_seed[s].get("selected_step", "")) for s in seeds)
        if len(seeds) == 1 and _finite(first.get("val_total_bpd_se")):
            row["val_total_bpd_se"] = first["val_total_bpd_se"]
        for metric in AVERAGED:
            values = [by_seed[s][metric] for s in seeds if _finite(by_seed[s].get(metric))]
            if values:
                mean, se = paired.mean_se(values)
                row[metric] = mean
                if metric in COMPARED and se is not None:
                    row[f"{metric}_se"] = se
        if len(seeds) == 1 and _finite(first.get("total_bpd_se")):
            row["total_bpd_se"], row["se_over"] = first["total_bpd_se"], "test images (1 seed)"
        else:
            row["se_over"] = "seeds"
            if "val_total_bpd" in row and len(seeds) > 1:
                row["val_total_bpd_se"] = paired.mean_se(list(_values(by_seed, "val_total_bpd").values()))[1]
        for metric, lower_is_better in COMPARED.items():
            if metric not in row:
                continue
            if name == reference:
                row[f"{metric}_verdict"] = "reference"
                continue
            bound = metric == "total_bpd"
            interval = paired.paired_difference(
                _values(by_seed, metric),
                _values(ref_runs, metric),
                cell_images=per_image.get(name) if bound else None,
                reference_images=per_image.get(reference) if bound else None,
                cell_se={s: r.get("total_bpd_se") for s, r in by_seed.items()} if bound else None,
                reference_se={s: r.get("total_bpd_se") for s, r in ref_runs.items()} if bound else None,
            )
            if interval is None:
                continue
            row.update(
                {
                    f"{metric}_diff": interval.diff,
                    f"{metric}_diff_lo": interval.lo,
                    f"{metric}_diff_hi": interval.hi,
                    f"{metric}_verdict": paired.verdict(interval, lower_is_better),
                    f"{metric}_interval": f"{interval.method}; {interval.n_seeds} paired seed(s)"
                    + (f" x {interval.n_images} images" if interval.n_images else ""),
                }
            )
        table.append(row)
    mark_best(table)
    return table


def mark_best(table: list[dict]) -> None:
    """best_by_val = "best" on the row with the lowest BEST_BY (the validation bound), in place; none without it."""
    scored = [r for r in table if _finite(r.get(BEST_BY))]
    if scored:
        min(scored, key=lambda r: r[BEST_BY])["best_by_val"] = "best"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "" if value is None else str(value)


def _mean_se(row: dict, metric: str) -> str:
    if metric not in row:
        return ""
    se = row.get(f"{metric}_se")
    return f"{row[metric]:.4g} ± {se:.2g}" if _finite(se) else _fmt(row[metric])


def _difference(row: dict, metric: str) -> str:
    if f"{metric}_diff" not in row:
        return row.get(f"{metric}_verdict", "")  # "reference", or nothing
    return f"{row[f'{metric}_diff']:+.3g} [{row[f'{metric}_diff_lo']:+.3g}, {row[f'{metric}_diff_hi']:+.3g}]"


def _verdict(row: dict, metric: str) -> str:
    verdict = row.get(f"{metric}_verdict", "") if f"{metric}_diff" in row else ""
    one_seed = "1 seed" in row.get(f"{metric}_interval", "")
    return f"{verdict} (1 seed)" if verdict and one_seed else verdict


MD_COLUMNS = (  # results.md: (header, the cell's text); a column shows where some row has text
    ("cell", lambda r: r["cell"]),
    ("seeds", lambda r: _fmt(r.get("seeds"))),
    ("val bpd (chooses)", lambda r: _mean_se(r, "val_total_bpd")),
    ("best by val", lambda r: r.get("best_by_val", "")),
    ("selected step", lambda r: r.get("selected_steps", "")),
    ("total_bpd", lambda r: _mean_se(r, "total_bpd")),
    ("Δ total_bpd [95%]", lambda r: _difference(r, "total_bpd")),
    ("bpd verdict", lambda r: _verdict(r, "total_bpd")),
    *(
        (k, (lambda r, k=k: _fmt(r.get(k))))
        for k in ("decoder_bpd", "diffusion_bpd", "prior_bpd", "recon_bpd", "kl_bpd")
    ),
    ("fd", lambda r: _mean_se(r, "fd")),
    ("fd_floor", lambda r: _fmt(r.get("fd_floor"))),
    ("Δ fd [95%]", lambda r: _difference(r, "fd")),
    ("fd verdict", lambda r: _verdict(r, "fd")),
    ("classifier_score", lambda r: _mean_se(r, "classifier_score")),
    ("Δ classifier_score [95%]", lambda r: _difference(r, "classifier_score")),
    ("cs verdict", lambda r: _verdict(r, "classifier_score")),
    ("FID", lambda r: _mean_se(r, "fid")),
    ("Δ FID [95%]", lambda r: _difference(r, "fid")),
    ("FID verdict", lambda r: _verdict(r, "fid")),
    ("IS", lambda r: _fmt(r.get("inception_score"))),
    ("KID", lambda r: _fmt(r.get("kid"))),
    *((k, (lambda r, k=k: _fmt(r.get(k)))) for k in ("final_train_loss", "steps", "train_time_s", "overrides")),
)


def table_notes(grid_name: str, reference: str, rows: list[dict]) -> str:
    """results.md's header: how many seeds, which split, what the ± and the intervals are."""
    seeds = sorted({r["seeds"] for r in rows if "seeds" in r})
    images = sorted({r["num_examples"] for r in rows if "num_examples" in r})
    n = "/".join(map(str, seeds)) or "?"
    split = f"the {SPLIT} split" + (f" ({'/'.join(map(str, images))} images)" if images else "")
    val = sorted({r["val_num_examples"] for r in rows if "val_num_examples" in r})
    val_split = f"the {CHOSEN_ON} split" + (f" ({'/'.join(map(str, val))} images)" if val else "")
    return (
        f"# {grid_name}: {n} seed(s) per cell, chosen on {val_split}, measured on {split}\n\n"
        f"Chosen on {val_split} (held out of the train split, ddpm_jax/data/splits.py): each run's checkpoint "
        "(the EMA params of its lowest validation bound estimate, `selected step`) and the best cell (`best by "
        "val`: the lowest `val bpd`, the selected params' bound on the validation images). Measured on "
        f"{split}: every other number (the Frechet distance: samples of the selected params against its "
        "images). A value is the mean "
        "± standard error over the cell's seeds (a cell with 1 seed: total_bpd ± the bound's standard error "
        f"over test images, which ignores seed noise). Δ: the cell minus the reference cell `{reference}`, "
        "paired by seed (the same config.seed: init, data order, noise) and, for the bound, by test image "
        "with the same t and eps draws per image within a seed; 95% interval: crossed seeds x images "
        "(two-way random effects, Satterthwaite df) for the bound, a t interval over the per-seed "
        "differences (N-1 df) for fd and the classifier score; with 1 seed the bound's interval is over "
        "test images only and ignores seed noise, marked (1 seed) (ddpm_jax/evaluation/paired.py). "
        "Verdict: better / worse when the interval excludes 0 (lower is better for bits/dim and fd, higher "
        "for the classifier score), else within noise. fd is the digits classifier's Fréchet distance, not FID; "
        "FID, IS and KID (Inception-V3, torch-fidelity's definitions) appear where the FID Inception weights "
        "were found. Per run: results_by_seed.csv.\n\n"
    )


def write_tables(rows: list[dict], out: str, *, runs: list[dict] | None = None, notes: str = "") -> tuple[str, ...]:
    """results.csv (every column), results.md (`notes`, then the columns that hold a value) and, given
    the runs' rows, results_by_seed.csv; returns the paths written."""
    out = fileio.as_path(out)

    def write_csv(path, columns, records):
        cols = [c for c in columns if any(c in r for r in records)]
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        return fileio.atomic_write(os.fspath(path), table.getvalue())

    paths = [write_csv(out / "results.csv", COLUMNS, rows)]
    cols = [(h, f) for h, f in MD_COLUMNS if any(f(r) for r in rows)]
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in rows]
    paths.insert(0, fileio.atomic_write(os.fspath(out / "results.md"), notes + "\n".join(lines) + "\n"))
    if runs:
        paths.append(write_csv(out / "results_by_seed.csv", RUN_COLUMNS, runs))
    return tuple(paths)


def plot_vs_step(
    runs: dict[str, list[str]],
    cells_dir: str,
    path: str,
    key: str | tuple[str, ...],
    ylabel: str,
    title: str,
    final_key: str | None = None,
) -> str | None:
    """metrics.jsonl's `key` (a tuple: a run's first key that it has, e.g. val_bpd_est, else test_bpd_est
    for runs from before the validation split) against step, per cell (cell -> its runs' folders) the mean
    over its seeds with a min-max band (log y), at the steps every seed has; `final_key`'s last value, if given, as a
    marker (mean, min-max bar). Returns the path, or None when no cell has the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm_jax.training import metric_writer

    keys = (key,) if isinstance(key, str) else tuple(key)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for name, folders in runs.items():
        curves, finals = [], []
        for folder in folders:
            records = metric_writer.read_metrics(fileio.as_path(cells_dir) / folder)
            have = next((k for k in keys if any(_finite(r.get(k)) for r in records)), keys[0])
            curve = {r["step"]: r[have] for r in records if _finite(r.get(have))}
            if curve:
                curves.append(curve)
            final = [(r["step"], r[final_key]) for r in records if final_key and _finite(r.get(final_key))]
            if final:
                finals.append(final[-1])
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not common:
            continue
        values = np.array([[c[s] for s in common] for c in curves])  # [seeds, steps]
        label = f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        (line,) = ax.plot(common, values.mean(axis=0), label=label)
        if len(curves) > 1:
            ax.fill_between(common, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
        if finals:
            steps, ys = np.array(finals).T
            mean = ys.mean()
            ax.errorbar(
                steps.max(),
                mean,
                yerr=[[mean - ys.min()], [ys.max() - mean]],
                fmt="o",
                color=line.get_color(),
                capsize=3,
            )
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def plot_grid_curves(runs: dict[str, list[str]], cells_dir: str, out: str) -> list[str]:
    """<out>/bpd_vs_step.png (the validation bound's estimate at each eval, the final test bound of the
    selected params as a dot) and <out>/loss_vs_step.png (the train loss), one curve per cell: the mean
    over its seeds, a min-max band."""
    counts = sorted({len(f) for f in runs.values() if f})
    seeds = f"{'/'.join(map(str, counts))} seed(s) per cell: line, the mean; band and bar, min-max over seeds"
    made = [
        plot_vs_step(
            runs,
            cells_dir,
            fileio.as_path(out) / "bpd_vs_step.png",
            ("val_bpd_est", "test_bpd_est"),
            "bound [bits/dim]",
            f"lines: the {CHOSEN_ON} bound's 20-strata estimate at each eval (test in runs before the validation "
            f"split); dots: the final {SPLIT} bound of the selected params\n{seeds}",
            final_key="test_total_bpd",
        ),
        plot_vs_step(
            runs,
            cells_dir,
            fileio.as_path(out) / "loss_vs_step.png",
            "loss",
            "train loss (the logged step's batch)",
            f"train loss at each log step (train batches)\n{seeds}",
        ),
    ]
    return [p for p in made if p]


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_grid(
    grid_path: str,
    out: str,
    *,
    extra: dict | None = None,
    only: list[str] | None = None,
    seeds: int | None = None,
    train: bool = True,
    **cell_kwargs,
) -> list[dict] | None:
    """Runs (or resumes) every cell of the grid with `seeds` seeds (default the grid's "seeds", else 1)
    in <out>/cells/<run>, seed by seed, then writes the tables and the plots to <out>/<grid name>/;
    returns the table's rows (one per cell, then the histogram baseline), or None when pre-empted
    (run the same command again). A reference cell left out by `only` is compared with where its runs
    have finished; it is not trained. train=False trains nothing: the tables and plots of the runs
    that have finished (a sweep still going, or one cut short)."""
    from ddpm_jax.training.validation import validate_config

    grid = load_grid(grid_path)
    if cell_kwargs.get("quality", True) and "inception_weights" not in cell_kwargs:
        from ddpm_jax.evaluation import fid

        cell_kwargs["inception_weights"] = fid.find_inception_weights()  # never downloads
        if cell_kwargs["inception_weights"] is None:
            print(
                "No FID Inception weights found ($DDPM_JAX_INCEPTION_WEIGHTS or the cache): the table has no FID "
                "column (ddpm_jax.fid says how to get them).",
                flush=True,
            )
    num_seeds = grid.get("seeds", 1) if seeds is None else seeds
    if num_seeds < 1:
        raise ConfigError(f"--seeds={num_seeds}: train at least 1 seed per cell.")
    names = list(grid["cells"])
    if only:
        unknown = [n for n in only if n not in grid["cells"]]
        if unknown:
            raise ConfigError(f"--only: {unknown} not in the grid; its cells are {', '.join(names)}.")
        names = [n for n in names if n in only]
    reference = reference_cell(grid)
    for name in names:  # every cell's config is checked before the first one trains
        config = cell_config(grid, name, extra)  # names the cell in its own errors
        try:
            validate_config(config)
        except ConfigError as e:
            raise ConfigError(f"grid cell {name!r}: {e}") from None
    cells_dir = os.fspath(fileio.as_path(out) / "cells")
    grid_name = os.path.splitext(os.path.basename(grid_path))[0]
    tables_dir = os.fspath(fileio.as_path(out) / grid_name)
    fileio.as_path(tables_dir).mkdir(parents=True, exist_ok=True)

    plan = [(k, name) for k in range(num_seeds) for name in names]  # seed by seed: a cut sweep has whole seeds

    def finished(name: str, k: int) -> bool:
        return (fileio.as_path(cells_dir) / run_name(name, k) / CELL_FILE).exists()

    todo = sum(not finished(name, k) for k, name in plan)
    print(
        f"Plan: {len(names)} cell(s) x {num_seeds} seed(s) = {len(plan)} runs in {cells_dir}: "
        f"{len(plan) - todo} finished, {todo} to run{'' if train else ' (not now: --notrain)'} "
        f"(the reference cell: {reference}).",
        flush=True,
    )
    runs: dict[str, dict[int, dict]] = {name: {} for name in names}
    durations = []
    for i, (k, name) in enumerate(plan):
        fresh = not finished(name, k)
        if fresh and not train:
            continue
        print(
            f"[{i + 1}/{len(plan)}] cell {name}, seed {k} ({run_name(name, k)})" + ("" if fresh else ": finished"),
            flush=True,
        )
        start = time.time()
        row = run_cell(grid, name, cells_dir, extra=extra, seed_index=k, **cell_kwargs)
        if row is None:
            print(f"Pre-empted in cell {name}, seed {k}: run the same command again to resume.", flush=True)
            return None
        runs[name][k] = row
        left = sum(not finished(n, j) for j, n in plan[i + 1 :])
        if fresh and left:
            durations.append(time.time() - start)
            eta = float(np.mean(durations)) * left
            until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=eta)
            print(
                f"That run took {_duration(durations[-1])}; about {_duration(eta)} for the {left} run(s) left "
                f"(done near {until:%H:%M} UTC), at the mean of the {len(durations)} run(s) trained so far.",
                flush=True,
            )
    cells = list(names)
    if reference not in runs:  # left out by --only: compared with where it has finished
        ref_runs = {k: r for k in range(num_seeds) if (r := finished_row(grid, reference, cells_dir, k, extra))}
        if ref_runs:
            runs[reference] = ref_runs
            cells.insert(0, reference)
        else:
            print(f"The reference cell {reference!r} has no finished run: no paired differences (add it to --only).")
    per_image = {
        name: {
            k: a
            for k, row in by_seed.items()
            if (a := per_image_bound(cells_dir, row.get("run", run_name(name, k)))) is not None
        }
        for name, by_seed in runs.items()
    }
    rows = summarize(cells, reference, runs, per_image)
    base = cell_config(grid, names[0], extra)
    if base.data.dataset == "digits":
        rows.append(histogram_row(base))
    by_seed = [runs[name][k] for name in cells for k in sorted(runs[name])]
    paths = write_tables(rows, tables_dir, runs=by_seed, notes=table_notes(grid_name, reference, rows))
    curves = plot_grid_curves(
        {name: [r.get("run", run_name(name, k)) for k, r in sorted(runs[name].items())] for name in cells},
        cells_dir,
        tables_dir,
    )
    print(fileio.read_text(paths[0]))
    print("wrote " + ", ".join([*paths, *curves]))
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
        "Root of the sweeps: <out>/cells/<cell>[@seed<k>] (one workdir per "
        "cell and seed, shared by the grids) and <out>/<grid>/results.md.",
    )
    _ONLY = flags.DEFINE_list("only", None, "Run only these cells (comma-separated names).")
    _SEEDS = flags.DEFINE_integer(
        "seeds",
        None,
        "Seeds per cell (config.seed + 0..N-1; default the grid's 'seeds', else 1): the table gives the mean "
        "± se over seeds and paired differences from the reference cell with 95% intervals.",
        lower_bound=1,
    )
    _SET = flags.DEFINE_multi_string(
        "set",
        [],
        "Extra override for every cell, field=value (a Python literal), e.g. --set=training.num_train_steps=600.",
    )
    _TRAIN = flags.DEFINE_bool(
        "train", True, "--notrain: train nothing; write the tables and plots of the runs that have finished."
    )
    _QUALITY = flags.DEFINE_bool(
        "quality",
        True,
        "Score sample quality for every cell (the digits-classifier Fréchet distance; FID where its weights are).",
    )
    _NUM = flags.DEFINE_integer(
        "num_samples", 500, "Samples per cell for the digits-classifier distance (and FID).", lower_bound=2
    )

    def main(argv):
        if not _GRID.value:
            raise ConfigError(
                f"--grid is required, e.g. --grid=schedules; the grids: {', '.join(configuration.names('ablations'))}."
            )
        run_grid(
            _GRID.value,
            _OUT.value,
            extra=parse_set(_SET.value),
            only=_ONLY.value,
            seeds=_SEEDS.value,
            train=_TRAIN.value,
            quality=_QUALITY.value,
            num_samples=_NUM.value,
        )

    cli.run(main)


if __name__ == "__main__":
    cli_main()
