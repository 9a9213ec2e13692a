"""The gap between a VDM run's probability-flow ODE NLL and its bound, per checkpoint, on the same images.

    python bench/ode_gap.py --workdir=runs/vdm [--steps=500,1500,4000] [--split=test] [--num_t=100]
        [--ode_steps=64] [--probes=2] [--exact_images=20] [--tstar=0.2,0.5,0.8] [--num_images=0]
        [--out=bench/results/ode_gap_<name>.json]

For each checkpoint step (default: every complete one) and the EMA params, on the images of --split:

- bound: `VDM.bound_terms` with --num_t values of t per image (bits/dim, mean +- se over images);
- ode: `evaluation.ode_eval.ode_nll_over_images` (RK4, --ode_steps, Hutchinson with --probes) on the same
  images, with its parts (prior, flow, dequantization, decoder);
- ode_exact: the same with the exact trace on the first --exact_images images (their Hutchinson value beside);
- gap = ode - bound per image, mean and its paired se.

With --tstar, a per-t diagnostic on the exact-trace images: the flow whose eps_hat is the network's for t < t*
and the pixel histogram's exact Bayes eps (bench/t_draw_variance.histogram_probs, the train split) for t >= t*.
t* = 0 is the histogram's own flow (its NLL: the histogram's, up to the decoder's slack), t* = 1 the network's
(but for the last RK4 stage, at t = 1); the same z as the exact-trace row (its key), so the rows are paired;
in between, where the ODE NLL moves shows where along t the network's flow departs from a consistent density.
The histogram is a different model from the network, so this locates, it does not bound.

Runs saved before a config field existed load with that field's current default (the bench only reads them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _merged(defaults: dict, stored: dict) -> dict:
    out = dict(defaults)
    for key, value in stored.items():
        out[key] = (
            _merged(defaults[key], value) if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value
        )
    return out


def load_config(workdir: str):
    """The run's config, on top of its method's current defaults (fields added since the run take those)."""
    import ml_collections

    from ddpm_jax.configuration import load_config_file
    from ddpm_jax.training import checkpoint
    from ddpm_jax.training.validation import validate_config, without_unread_fields

    stored = checkpoint.load_config(workdir).to_dict()
    defaults = load_config_file(stored["method"]).to_dict()
    config = without_unread_fields(ml_collections.ConfigDict(_merged(defaults, stored)))
    validate_config(config, num_devices=1)
    return config


def checkpoint_steps(workdir: str) -> list[int]:
    from ddpm_jax.training import checkpoint

    return sorted(checkpoint.complete_steps(workdir))


def load_params(workdir: str, step: int | None = None, which: str = "ema"):
    """(config, method, params) of the run's checkpoint at `step` (None: the newest); which: "ema" or "raw"."""
    import orbax.checkpoint as ocp

    from ddpm_jax import methods
    from ddpm_jax.training import checkpoint, train_lib

    config = load_config(workdir)
    method = methods.from_config(config)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise SystemExit(f"error: {workdir} holds no complete checkpoint.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise SystemExit(f"error: {workdir} has no checkpoint at step {step}; it has {steps}.")
    target = train_lib.abstract_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(config.seed))
    mngr = checkpoint.make_manager(workdir, read_only=True)
    state = mngr.restore(step, args=ocp.args.StandardRestore(checkpoint._host_target(target)))
    state = jax.device_get(state)
    return config, method, state.ema_params if which == "ema" else state.params


def histogram_probs(train_uint8: np.ndarray, smoothing: float = 0.1) -> np.ndarray:
    """Per-pixel probabilities over the 256 bins [H, W, C, 256]: train counts plus `smoothing` on the 17 grey
    levels the digits use (their support), as tests/test_vdm.py's and tests/test_ode_bayes.py's histogram."""
    from ddpm_jax.data.digits_builder import NUM_LEVELS

    counts = (train_uint8.astype(np.int64)[..., None] == np.arange(256)).sum(0).astype(np.float64)
    levels = np.round(np.arange(NUM_LEVELS) * 255 / (NUM_LEVELS - 1)).astype(int)
    counts[..., levels] += smoothing
    return counts / counts.sum(-1, keepdims=True)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


class _Flow:
    """A Method-like object for ode_nll_over_images: the given (gamma_fn, eps_fn)."""

    name = "vdm"

    def __init__(self, gamma_fn, eps_fn):
        self.flow = (gamma_fn, eps_fn)

    def probability_flow(self, params):
        return self.flow


def ode_per_image(method, params, images, rng, *, num_steps, probes, exact, batch_size=100):
    """Per-image ODE NLL totals (bits/dim) and the summary of ode_nll_over_images (which returns means only:
    its per-image totals are recomputed here with the same keys for the paired gap)."""
    from ddpm_jax.core import likelihood, pixels

    gamma_fn, eps_fn = method.probability_flow(params)
    x = pixels.scale_images(images)
    n, batch_size = x.shape[0], min(batch_size, x.shape[0])

    @jax.jit
    def batch_nll(xb, key):
        return likelihood.ode_nll_bpd(
            gamma_fn, eps_fn, xb, key, num_steps=num_steps, exact_trace=exact, num_probes=probes
        )

    parts = []
    for i, start in enumerate(range(0, n, batch_size)):  # ode_eval's batching and keys
        xb = x[start : start + batch_size]
        pad = batch_size - xb.shape[0]
        xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)]) if pad else xb
        out = jax.device_get(batch_nll(xb, jax.random.fold_in(rng, i)))
        parts.append({k: np.asarray(v, np.float64)[: batch_size - pad] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def measure_step(config, method, params, images, args, probs, step) -> dict:
    from ddpm_jax.core import pixels

    rng = jax.random.PRNGKey(args.seed)
    n = len(images)
    x = jnp.asarray(pixels.scale_images(images))
    row = {"step": step, "num_images": n}
    t0 = time.time()
    bound_fn = jax.jit(lambda p, xb, k, r: method.bound_terms(p, xb, k, r, num_strata=args.num_t))
    bound = []
    for i, start in enumerate(range(0, n, args.batch_size)):
        xb = x[start : start + args.batch_size]
        keys = jax.random.split(jax.random.fold_in(rng, 10_000 + i), xb.shape[0])
        bound.append(jax.device_get(bound_fn(params, xb, keys, jax.random.fold_in(rng, 20_000 + i))))
    bound = {k: np.concatenate([np.asarray(b[k], np.float64) for b in bound]) for k in bound[0]}
    row["bound"], row["bound_se"] = _mean_se(bound["total_bpd"])
    row.update({f"bound_{k}": float(v.mean()) for k, v in bound.items() if k != "total_bpd"})
    row["bound_s"] = time.time() - t0

    t0 = time.time()
    ode = ode_per_image(
        method,
        params,
        images,
        jax.random.fold_in(rng, 2),
        num_steps=args.ode_steps,
        probes=args.probes,
        exact=False,
        batch_size=args.batch_size,
    )
    row["ode"], row["ode_se"] = _mean_se(ode["total_bpd"])
    row.update({f"ode_{k}": float(ode[k].mean()) for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd")})
    row["gap"], row["gap_se"] = _mean_se(ode["total_bpd"] - bound["total_bpd"])
    row["ode_s"] = time.time() - t0

    m = min(args.exact_images, n)
    if m:
        t0 = time.time()
        exact = ode_per_image(
            method,
            params,
            images[:m],
            jax.random.fold_in(rng, 3),
            num_steps=args.ode_steps,
            probes=args.probes,
            exact=True,
            batch_size=args.batch_size,
        )
        row["exact_images"] = m
        row["ode_exact"], row["ode_exact_se"] = _mean_se(exact["total_bpd"])
        row["ode_hutch_same"], _ = _mean_se(ode["total_bpd"][:m])
        row["bound_same"], _ = _mean_se(bound["total_bpd"][:m])
        row["gap_exact"], row["gap_exact_se"] = _mean_se(exact["total_bpd"] - bound["total_bpd"][:m])
        row.update(
            {f"ode_exact_{k}": float(exact[k].mean()) for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd")}
        )
        row["ode_exact_s"] = time.time() - t0
        if args.tstar:
            row["tstar"] = diagnose_tstar(method, params, images[:m], probs, args, rng)
    return row


def diagnose_tstar(method, params, images, probs, args, rng) -> list[dict]:
    """The exact-trace ODE NLL of the flow with the network's eps below t* and the histogram's Bayes eps above."""
    from ddpm_jax.core import vdm

    gamma_fn, net_eps = method.probability_flow(params)
    bayes = vdm.bayes_eps_fn_for_histogram(probs, gamma_fn)
    out = []
    for tstar in args.tstar:

        def eps_fn(z, t, tstar=tstar):
            w = (t >= tstar).astype(z.dtype)[:, None, None, None]
            return w * bayes(z, t) + (1.0 - w) * net_eps(z, t)

        t0 = time.time()
        res = ode_per_image(
            _Flow(gamma_fn, eps_fn),
            None,
            images,
            jax.random.fold_in(rng, 3),
            num_steps=args.ode_steps,
            probes=args.probes,
            exact=True,
            batch_size=args.batch_size,
        )
        mean, se = _mean_se(res["total_bpd"])
        out.append(
            {
                "tstar": tstar,
                "ode_exact": mean,
                "ode_exact_se": se,
                "seconds": time.time() - t0,
                **{k: float(res[k].mean()) for k in ("prior_bpd", "flow_bpd", "dequant_bpd", "recon_bpd")},
            }
        )
    return out


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'step':>6} {'bound':>16} {'ode (Hutch)':>16} {'gap (paired)':>16} {'ode exact [m]':>20} "
        f"{'bound [m]':>9} {'prior':>7} {'flow':>8} {'dequant':>8} {'decoder':>8}"
    )
    for r in rows:
        exact = f"{r['ode_exact']:.4f}+-{r['ode_exact_se']:.4f} [{r['exact_images']}]" if "ode_exact" in r else "-"
        same = f"{r['bound_same']:.4f}" if "bound_same" in r else "-"
        print(
            f"{r['step']:>6} {r['bound']:>8.4f}+-{r['bound_se']:.4f} {r['ode']:>8.4f}+-{r['ode_se']:.4f} "
            f"{r['gap']:>+8.4f}+-{r['gap_se']:.4f} {exact:>20} {same:>9} {r['ode_prior_bpd']:>7.4f} "
            f"{r['ode_flow_bpd']:>8.4f} {r['ode_dequant_bpd']:>8.4f} {r['ode_recon_bpd']:>8.4f}"
        )
        for d in r.get("tstar", []):
            print(
                f"{'':>6}   t* = {d['tstar']:.2f} (network below, histogram's Bayes eps above): ode exact "
                f"{d['ode_exact']:.4f} +- {d['ode_exact_se']:.4f} (prior {d['prior_bpd']:.4f}, flow {d['flow_bpd']:.4f})"
            )


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", default="", help="checkpoint steps, comma-separated (default: all complete ones)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_images", type=int, default=0, help="the first N images of the split (0: all)")
    parser.add_argument("--num_t", type=int, default=100, help="values of t per image for the bound")
    parser.add_argument("--ode_steps", type=int, default=64)
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--exact_images", type=int, default=20)
    parser.add_argument("--tstar", type=_floats, default=[], help="t* values of the per-t diagnostic, e.g. 0,0.3,0.6,1")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from ddpm_jax.data import splits
    from ddpm_jax.data.digits_builder import digits_split_indices, digits_uint8

    steps = [int(s) for s in _floats(args.steps)] or checkpoint_steps(args.workdir)
    rows, start = [], time.time()
    probs = None
    for step in steps:
        config, method, params = load_params(args.workdir, step)
        if config.method != "vdm":
            raise SystemExit(f"error: --workdir={args.workdir} is a {config.method!r} run; this bench needs VDM.")
        if probs is None:
            images = splits.load_split(config, args.split)
            images = images[: args.num_images] if args.num_images else images
            if args.tstar:
                if config.data.dataset != "digits":
                    raise SystemExit("error: --tstar needs the digits (its histogram is of the digits train split).")
                all_images, _ = digits_uint8()
                probs = histogram_probs(all_images[digits_split_indices()["train"]])
        t0 = time.time()
        rows.append(
            dict(measure_step(config, method, params, np.asarray(images), args, probs, step), seconds=time.time() - t0)
        )
        print(f"step {step}: {time.time() - t0:.1f} s", flush=True)
    print_table(rows)
    name = os.path.basename(os.path.normpath(args.workdir))
    out = args.out or os.path.join(REPO, "bench", "results", f"ode_gap_{name}.json")
    result = {
        "command": "python " + " ".join(sys.argv),
        "workdir": args.workdir,
        "split": args.split,
        "machine": platform.node(),
        "jax_backend": jax.default_backend(),
        "load_average": os.getloadavg(),
        "wall_s": time.time() - start,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
