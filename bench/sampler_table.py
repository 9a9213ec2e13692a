"""The sampler table: each sampler's Fréchet distance and the time sample.py takes for it.

    python bench/sampler_table.py --workdir=runs/default [--num=500] [--out=bench/results/samplers_<name>.json]
        [--cells=ancestral1000,ddim50,...] [--repeat_seed=1]

Each cell runs the real command, `python sample.py --workdir=W --num=N --sampler=S --steps=K --seed=0`, in
a subprocess and times it from start to exit (imports, loading, compiling or reading the compile cache,
sampling, writing), then scores the saved samples with the digits classifier: `val_fd`, the Fréchet distance
against the run's validation split (data.splits.load_validation: the digits' 150 held-out train images) with
its floor `val_fd_floor` (as many training-set images against the same validation images), which is what a
sampler is chosen by (`choose`: the lowest val_fd); and, measured beside it, `digits_sample_quality` (fd against
the test split, its train-vs-test floor, the classifier score). The first cell is drawn again with
--repeat_seed to show fd's seed noise. (The digits classifier itself was trained on the whole train split.) Cells are written to the JSON as they finish: an interrupted table
resumes. The default cells depend on the run's method: the DDPM's ancestral T, respaced 250 / 100 / 50 and
DDIM 50 / 20; VDM's chain of 1000 / 250 / 100 / 50 steps and DDIM 100 / 50 / 20; another method's default
sampler. A cell's sampler must be in the method's `samplers` mapping (ddpm_jax.methods).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_CELLS = {
    "ddpm": ("ancestral", "respaced250", "respaced100", "respaced50", "ddim50", "ddim20"),
    "vdm": ("ancestral1000", "ancestral250", "ancestral100", "ancestral50", "ddim100", "ddim50", "ddim20"),
}


def parse_cell(cell: str) -> tuple[str, int | None]:
    """'ddim50' -> ('ddim', 50); 'ancestral' -> ('ancestral', None)."""
    match = re.fullmatch(r"([a-z]+)(\d*)", cell)
    if not match:
        raise SystemExit(f"error: --cells: {cell!r} is not a sampler name with an optional step count (ddim50).")
    return match.group(1), int(match.group(2)) if match.group(2) else None


def run_cell(workdir: str, cell: str, num: int, seed: int, out_dir: str) -> dict:
    sampler, steps = parse_cell(cell)
    stem = os.path.join(out_dir, f"{cell}_seed{seed}")
    command = [sys.executable, "sample.py", f"--workdir={workdir}", f"--num={num}", f"--sampler={sampler}"]
    command += [f"--seed={seed}", f"--out={stem}"] + ([f"--steps={steps}"] if steps else [])
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    import numpy as np

    from ddpm_jax.evaluation import digits_classifier

    samples = np.load(stem + ".npz")["samples"]
    quality = digits_classifier.digits_sample_quality(samples, seed=seed)
    chosen_by = validation_fd(workdir, samples, seed)
    row = {"cell": cell, "seed": seed, "num": num, "wall_s": wall, **chosen_by, **quality}
    return {**row, "command": " ".join(command[1:])}


_REFERENCE = {}  # workdir -> (the validation images' feature stats, the training set's images), read once


def validation_fd(workdir: str, samples, seed: int) -> dict:
    """{"val_fd": the samples' Fréchet distance to the run's validation split in the digits classifier's
    features, "val_fd_floor": the same for min(N, len(training set)) training-set images drawn with
    np.random.default_rng(seed), "val_num_examples"}."""
    import numpy as np

    from ddpm_jax.core import pixels, quality
    from ddpm_jax.data import splits
    from ddpm_jax.evaluation import digits_classifier
    from ddpm_jax.run import load_config

    classifier = digits_classifier.load_or_train()
    if workdir not in _REFERENCE:
        config = load_config(workdir)
        val = pixels.scale_images(np.asarray(splits.load_validation(config)))
        train = pixels.scale_images(np.asarray(splits.load_train(config)))
        stats = quality.feature_stats(digits_classifier.features_and_probs(classifier, val)[0])
        _REFERENCE[workdir] = (stats, train, len(val))
    stats, train, num_val = _REFERENCE[workdir]
    subset = np.sort(np.random.default_rng(seed).choice(len(train), min(len(samples), len(train)), replace=False))
    f_samples = digits_classifier.features_and_probs(classifier, np.clip(samples, -1, 1))[0]
    f_train = digits_classifier.features_and_probs(classifier, train[subset])[0]
    return {
        "val_fd": quality.frechet_distance(*quality.feature_stats(f_samples), *stats),
        "val_fd_floor": quality.frechet_distance(*quality.feature_stats(f_train), *stats),
        "val_num_examples": num_val,
    }


def choose(rows: list[dict]) -> dict | None:
    """The row with the lowest validation fd (seed 0 rows; rows from before val_fd are skipped)."""
    scored = [r for r in rows if r["seed"] == 0 and "val_fd" in r]
    return min(scored, key=lambda r: r["val_fd"]) if scored else None


def table(rows: list[dict]) -> str:
    lines = [
        "| sampler | seed | val fd (floor): chooses | test fd (floor): measures | classifier score | sample.py wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        val = f"{r['val_fd']:.2f} ({r['val_fd_floor']:.2f})" if "val_fd" in r else ""
        lines.append(
            f"| {r['cell']} | {r['seed']} | {val} | {r['fd']:.2f} ({r['fd_floor']:.2f}) | "
            f"{r['classifier_score']:.2f} | {r['wall_s']:.1f} |"
        )
    best = choose(rows)
    if best is not None:
        lines.append(
            f"\nChosen on the validation split: {best['cell']} (val fd {best['val_fd']:.2f}); its test fd "
            f"{best['fd']:.2f} is the number to report."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--cells", default=None, help="comma-separated, e.g. ancestral,ddim50 (default: by method)")
    parser.add_argument("--repeat_seed", type=int, default=1, help="the first cell again with this seed (fd noise)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from ddpm_jax import methods
    from ddpm_jax.run import load_config

    method_class = methods.method_class(load_config(args.workdir))
    method, samplers = method_class.name, method_class.samplers
    cells = args.cells.split(",") if args.cells else list(DEFAULT_CELLS.get(method, (next(iter(samplers)),)))
    for cell in cells:  # a name outside the method's samplers mapping fails here, not in the cell's subprocess
        if parse_cell(cell)[0] not in samplers:
            raise SystemExit(f"error: --cells: {cell!r}: method {method!r} has the samplers {', '.join(samplers)}.")
    name = os.path.basename(os.path.normpath(args.workdir))
    out = args.out or os.path.join(REPO, "bench", "results", f"samplers_{name}.json")
    done = json.load(open(out))["rows"] if os.path.exists(out) else []
    todo = [(c, 0) for c in cells] + [(cells[0], args.repeat_seed)]
    with tempfile.TemporaryDirectory() as tmp:
        for cell, seed in todo:
            if any(r["cell"] == cell and r["seed"] == seed for r in done):
                continue
            row = run_cell(os.path.abspath(args.workdir), cell, args.num, seed, tmp)
            print(
                f"{cell} seed {seed}: val fd {row['val_fd']:.2f} (floor {row['val_fd_floor']:.2f}), test fd "
                f"{row['fd']:.2f} (floor {row['fd_floor']:.2f}), {row['wall_s']:.1f} s"
            )
            done.append(row)
            with open(out + ".tmp", "w") as f:
                json.dump({"workdir": args.workdir, "method": method, "rows": done}, f, indent=1)
            os.replace(out + ".tmp", out)
    print(table(done))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
