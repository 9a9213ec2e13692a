"""The sampler table: each sampler's Fréchet distance and the time sample.py takes for it.

    python bench/sampler_table.py --workdir=runs/default [--num=500] [--out=bench/results/samplers_<name>.json]
        [--cells=ancestral1000,ddim50,...] [--repeat_seed=1]

Each cell runs the real command, `python sample.py --workdir=W --num=N --sampler=S --steps=K --seed=0`, in
a subprocess and times it from start to exit (imports, loading, compiling or reading the compile cache,
sampling, writing), then scores the saved samples with the digits classifier (`digits_sample_quality`: fd
against the test split, its train-vs-test floor, the classifier score). The first cell is drawn again with
--repeat_seed to show fd's seed noise. Cells are written to the JSON as they finish: an interrupted table
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
    return {"cell": cell, "seed": seed, "num": num, "wall_s": wall, **quality, "command": " ".join(command[1:])}


def table(rows: list[dict]) -> str:
    lines = ["| sampler | seed | fd (floor) | classifier score | sample.py wall (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['seed']} | {r['fd']:.2f} ({r['fd_floor']:.2f}) | {r['classifier_score']:.2f} | "
            f"{r['wall_s']:.1f} |"
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
            print(f"{cell} seed {seed}: fd {row['fd']:.2f} (floor {row['fd_floor']:.2f}), {row['wall_s']:.1f} s")
            done.append(row)
            with open(out + ".tmp", "w") as f:
                json.dump({"workdir": args.workdir, "method": method, "rows": done}, f, indent=1)
            os.replace(out + ".tmp", out)
    print(table(done))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
