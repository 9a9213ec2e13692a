"""The omega_t table: the main job trained with each weighting of the diffusion loss, at equal steps (so equal wall
time: a weighting is one multiply per example), scored by the true ELBO on the validation and test splits and by fd.

    python bench/omega_table.py [--cells=elbo,simple,sigmoid,...] [--steps=1500] [--seeds=0] [--num=500]
        [--out=bench/results/omega_table.json] [--runs=runs/omega]

Each cell is `python train.py --config=vdm --config.vdm.weighting=W [--config.vdm.weighting_bias=B]
--config.seed=S --config.training.num_train_steps=N` in its own workdir (a finished workdir is not trained again:
the table resumes), then 500 samples with the default sampler (`sample.py --num=500 --seed=0`), scored with the
digits classifier's Fréchet distance against the validation split (what a choice may read) and against the test
split (what is reported), each beside its floor (500 real training images against the same split). The bound is the
run's results.json: `val_*` from the selected checkpoint's validation estimate and `total_bpd` on the test split.
A cell name is a weighting, optionally with the sigmoid's bias: `sigmoid`, `sigmoid+2` (b = 2), `sigmoid-3`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_CELLS = ("elbo", "simple", "v", "x0", "edm", "sigmoid", "sigmoid+2")


def parse_cell(cell: str) -> tuple[str, float | None]:
    """'sigmoid+2' -> ('sigmoid', 2.0); 'elbo' -> ('elbo', None)."""
    match = re.fullmatch(r"([a-z0-9]+?)([+-]\d+(?:\.\d+)?)?", cell)
    if not match:
        raise SystemExit(f"error: --cells: {cell!r} is not a weighting with an optional bias (sigmoid+2).")
    return match.group(1), float(match.group(2)) if match.group(2) else None


def fd_against(classifier, samples, reference, train_pool, seed: int) -> dict:
    """fd of the samples to `reference` (uint8 or scaled images), and its floor: as many real images of train_pool."""
    import numpy as np

    from ddpm_jax.core import pixels, quality
    from ddpm_jax.evaluation import digits_classifier

    def feats(images):  # uint8 splits -> [-1, 1] like the samples
        images = pixels.scale_images(images) if images.dtype == np.uint8 else images
        return digits_classifier.features_and_probs(classifier, images)[0]

    ref = quality.feature_stats(feats(reference))
    n = min(len(samples), len(train_pool))
    subset = np.sort(np.random.default_rng(seed).choice(len(train_pool), n, replace=False))
    return {
        "fd": quality.frechet_distance(*quality.feature_stats(feats(samples)), *ref),
        "fd_floor": quality.frechet_distance(*quality.feature_stats(feats(train_pool[subset])), *ref),
    }


def run_cell(cell: str, seed: int, steps: int, num: int, runs: str) -> dict:
    weighting, bias = parse_cell(cell)
    workdir = os.path.join(runs, f"{cell}_seed{seed}_steps{steps}")
    command = [sys.executable, "train.py", "--config=vdm", f"--workdir={workdir}", f"--config.seed={seed}"]
    command += [f"--config.vdm.weighting={weighting}", f"--config.training.num_train_steps={steps}"]
    command += [f"--config.vdm.weighting_bias={bias}"] if bias is not None else []
    results_path = os.path.join(workdir, "results.json")
    start = time.perf_counter()
    if not os.path.exists(results_path):
        subprocess.run(command, cwd=REPO, check=True)
    train_wall = time.perf_counter() - start
    with open(results_path) as f:
        results = json.load(f)
    stem = os.path.join(workdir, f"samples{num}_seed0")
    if not os.path.exists(stem + ".npz"):
        subprocess.run(
            [sys.executable, "sample.py", f"--workdir={workdir}", f"--num={num}", "--seed=0", f"--out={stem}"],
            cwd=REPO,
            check=True,
        )
    import numpy as np

    from ddpm_jax.data import splits
    from ddpm_jax.evaluation import digits_classifier
    from ddpm_jax.run import load_config

    config = load_config(workdir)
    samples = np.load(stem + ".npz")["samples"]
    classifier = digits_classifier.load_or_train()
    train_pool = splits.load_train(config)
    scores = {
        f"val_{k}": v for k, v in fd_against(classifier, samples, splits.load_validation(config), train_pool, 0).items()
    }
    # the test scores as every fd in docs/results.md: digits_sample_quality (its floor: 500 of the 1500 train images)
    scores.update({f"test_{k}": v for k, v in digits_classifier.digits_sample_quality(samples, seed=0).items()})
    keep = ("total_bpd", "total_bpd_se", "selected_step", "selected_by", "selected_value", "params_sha256", "step")
    return {
        "cell": cell,
        "seed": seed,
        "steps": steps,
        "train_wall_s": train_wall,
        **{k: results[k] for k in keep if k in results},
        **{k: v for k, v in results.items() if k.startswith("val_")},
        **scores,
        "command": " ".join(command[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--runs", default="runs/omega")
    parser.add_argument("--out", default="bench/results/omega_table.json")
    parser.add_argument("--rescore", action="store_true", help="score the finished rows of --out again")
    args = parser.parse_args()
    out = os.path.join(REPO, args.out)
    rows = json.load(open(out)) if os.path.exists(out) else []
    if args.rescore:  # scores again from the saved runs and samples (nothing is trained or sampled again)
        runs = os.path.join(REPO, args.runs)
        rows = [
            {**run_cell(r["cell"], r["seed"], r["steps"], args.num, runs), "train_wall_s": r["train_wall_s"]}
            for r in rows
        ]
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    done = {(r["cell"], r["seed"], r["steps"]) for r in rows}
    for seed in (int(s) for s in args.seeds.split(",")):
        for cell in args.cells.split(","):
            parse_cell(cell)
            if (cell, seed, args.steps) in done:
                continue
            rows.append(run_cell(cell, seed, args.steps, args.num, os.path.join(REPO, args.runs)))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
    print(
        "| weighting | seed | steps | val bound | test bound ± se | val fd (floor) | test fd (floor) | selected step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['cell']} | {r['seed']} | {r['steps']} | {r['val_total_bpd']:.3f} ± {r['val_total_bpd_se']:.3f} | "
            f"{r['total_bpd']:.3f} ± {r['total_bpd_se']:.3f} | {r['val_fd']:.2f} ({r['val_fd_floor']:.2f}) | "
            f"{r['test_fd']:.2f} ({r['test_fd_floor']:.2f}) | {r.get('selected_step', '')} |"
        )


if __name__ == "__main__":
    main()
