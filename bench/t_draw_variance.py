"""Which draw of t gives VDM's training loss the lower variance: the method's stratified draw or VDM's shared offset.

    python bench/t_draw_variance.py [--workdir=runs/vdm] [--reps=400] [--batch=128]
        [--out=bench/results/t_draw_variance.json]

Three draws of the t of a batch of B at positions i = 0..B-1 (the data are shuffled, so positions are random):

- stratified: t_i = (i + u_i) / B, u_i ~ U(0, 1) per example (`VDM.draw_training_inputs`, what training uses);
- shared:     t_i = mod(u + i / B, 1), one u for the whole batch (VDM's low-discrepancy draw, vdm.low_discrepancy_t);
- iid:        t_i ~ U(0, 1) independently (the baseline neither improves on).

Each repetition draws a fresh batch from the digits train split, and one eps and eps_0 per example; the three
draws share them and differ only in t (a paired comparison). Reported per model: the variance over repetitions
of the batch-mean loss (bits/dim), and for networks the gradient's total variance E||g - E g||^2 and the
variance of ||g||; with bootstrap standard errors of each ratio to the stratified draw's. Models: the
histogram's exact Bayes denoiser (fixed linear gamma; the optimum for that data: a stand-in for a well-trained
network; bench/ode_gap.histogram_probs), the main job's network at its random init, and --workdir's EMA params
(a trained run, at --step) if given. The loss is the method's "loss" (the ELBO under vdm.weighting = "elbo").
"""

from __future__ import annotations

import argparse
import json
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

DRAWS = ("stratified", "shared", "iid")


def digits_train():
    """The digits train split in [-1, 1], float32 [1500, 8, 8, 1], and as uint8."""
    from ddpm_jax.data.digits_builder import digits_split_indices, digits_uint8

    images, _ = digits_uint8()
    train = images[digits_split_indices()["train"]]
    return (train / 127.5 - 1.0).astype(np.float32), train


def draw_t(kind: str, key, batch: int, stratified_t):
    if kind == "stratified":
        return stratified_t
    if kind == "shared":
        return jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch) / batch, 1.0)
    return jax.random.uniform(key, (batch,))


def _histogram_loss(probs):
    from ddpm_jax.core import vdm

    gamma = vdm.FixedLinearGamma(vdm.GAMMA_MIN, vdm.GAMMA_MAX)
    gamma_fn = lambda t: gamma.apply({}, t)  # noqa: E731
    eps_fn = vdm.bayes_eps_fn_for_histogram(probs, gamma_fn)

    def loss(params, x, inputs):
        ones = jnp.ones((x.shape[0],))
        nats = vdm.recon_loss(gamma_fn(0 * ones), x, inputs["noise_0"]) + vdm.prior_loss(gamma_fn(ones), x)
        nats = nats + vdm.diffusion_loss(gamma_fn, eps_fn, x, inputs["t"], inputs["noise"])
        return jnp.mean(vdm.nats_to_bpd(nats, x))

    return loss


def measure(method, params, loss_fn, data, reps: int, batch: int, seed: int, grads: bool) -> dict:
    """Per draw: the batch-mean losses [reps] and (grads) the gradient statistics, paired over draws."""

    def one(key, idx):
        x = jnp.asarray(data)[idx]
        k_ex, k_t = jax.random.split(key)
        keys = jax.random.split(k_ex, batch)
        base = method.draw_training_inputs(keys, x, None, position=(jnp.arange(batch), batch))
        out = {}
        for kind in DRAWS:
            inputs = dict(base, t=draw_t(kind, k_t, batch, base["t"]))
            if grads:
                value, g = jax.value_and_grad(loss_fn)(params, x, inputs)
                flat = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(g)])
                out[kind] = (value, flat)
            else:
                out[kind] = (loss_fn(params, x, inputs), jnp.zeros(1))
        return out

    one = jax.jit(one)
    rng = np.random.default_rng(seed)
    losses = {k: [] for k in DRAWS}
    norms = {k: [] for k in DRAWS}
    g_sum = {k: 0.0 for k in DRAWS}
    g_sq = {k: 0.0 for k in DRAWS}
    for r in range(reps):
        if r and r % 50 == 0:
            print(f"  {r}/{reps} repetitions", flush=True)
        idx = rng.choice(len(data), batch, replace=False)
        out = jax.device_get(one(jax.random.PRNGKey(seed * 100003 + r), idx))
        for kind, (value, g) in out.items():
            g = np.asarray(g, np.float64)
            losses[kind].append(float(value))
            norms[kind].append(float(np.linalg.norm(g)))
            g_sum[kind] = g_sum[kind] + g
            g_sq[kind] += float(g @ g)
    res = {}
    for kind in DRAWS:
        mean_g = g_sum[kind] / reps
        res[kind] = {
            "losses": np.asarray(losses[kind]),
            "norms": np.asarray(norms[kind]),
            "grad_total_var": (g_sq[kind] / reps - float(mean_g @ mean_g)) * reps / (reps - 1) if grads else None,
        }
    return res


def summarise(name: str, res: dict, boot: int = 2000, seed: int = 0) -> dict:
    """Variances and their ratios to the stratified draw's, with paired bootstrap standard errors."""
    rng = np.random.default_rng(seed)
    reps = len(res["stratified"]["losses"])
    idx = rng.integers(0, reps, (boot, reps))
    row = {"model": name, "reps": reps}
    for kind in DRAWS:
        loss, norm = res[kind]["losses"], res[kind]["norms"]
        row[f"{kind}_loss_mean"] = float(loss.mean())
        row[f"{kind}_loss_var"] = float(loss.var(ddof=1))
        row[f"{kind}_grad_total_var"] = res[kind]["grad_total_var"]
        row[f"{kind}_grad_norm_var"] = float(norm.var(ddof=1)) if res[kind]["grad_total_var"] is not None else None
        if kind != "stratified":
            ref = res["stratified"]["losses"]
            ratio = loss[idx].var(1, ddof=1) / ref[idx].var(1, ddof=1)
            row[f"{kind}_loss_var_ratio"] = float(loss.var(ddof=1) / ref.var(ddof=1))
            row[f"{kind}_loss_var_ratio_se"] = float(ratio.std(ddof=1))
            if res[kind]["grad_total_var"] is not None:
                refn = res["stratified"]["norms"]
                r_n = norm[idx].var(1, ddof=1) / refn[idx].var(1, ddof=1)
                row[f"{kind}_grad_norm_var_ratio"] = float(norm.var(ddof=1) / refn.var(ddof=1))
                row[f"{kind}_grad_norm_var_ratio_se"] = float(r_n.std(ddof=1))
                row[f"{kind}_grad_total_var_ratio"] = res[kind]["grad_total_var"] / res["stratified"]["grad_total_var"]
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'model':<22} {'draw':<11} {'mean loss':>10} {'var(loss)':>11} {'ratio':>14} {'E|g-Eg|^2':>11} "
        f"{'ratio':>7} {'var|g|':>10} {'ratio':>14}"
    )
    for row in rows:
        for kind in DRAWS:
            ratio = (
                "1"
                if kind == "stratified"
                else f"{row[f'{kind}_loss_var_ratio']:.3f}+-{row[f'{kind}_loss_var_ratio_se']:.3f}"
            )
            gv, nv = row[f"{kind}_grad_total_var"], row[f"{kind}_grad_norm_var"]
            g_ratio = "1" if kind == "stratified" or gv is None else f"{row[f'{kind}_grad_total_var_ratio']:.3f}"
            n_ratio = (
                "1"
                if kind == "stratified" or nv is None
                else f"{row[f'{kind}_grad_norm_var_ratio']:.3f}+-{row[f'{kind}_grad_norm_var_ratio_se']:.3f}"
            )
            print(
                f"{row['model']:<22} {kind:<11} {row[f'{kind}_loss_mean']:>10.4f} {row[f'{kind}_loss_var']:>11.3e} "
                f"{ratio:>14} {('-' if gv is None else f'{gv:.3e}'):>11} {g_ratio:>7} "
                f"{('-' if nv is None else f'{nv:.3e}'):>10} {n_ratio:>14}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="a trained VDM run: its EMA params are one more model")
    parser.add_argument("--step", type=int, default=None, help="--workdir's checkpoint step (default: the newest)")
    parser.add_argument("--reps", type=int, default=400, help="repetitions per network model")
    parser.add_argument("--hist_reps", type=int, default=2000, help="repetitions for the histogram model (cheap)")
    parser.add_argument("--models", default="histogram,random,trained", help="which of these to run")
    parser.add_argument("--batch", type=int, default=128, help="the global batch (the main job's: 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "t_draw_variance.json"))
    args = parser.parse_args()

    from ode_gap import checkpoint_steps, histogram_probs, load_params

    from ddpm_jax import methods
    from ddpm_jax.configuration import load_config_file

    data, train_uint8 = digits_train()
    config = load_config_file("vdm")  # the main job's method and network
    method = methods.from_config(config)
    net_loss = lambda p, x, inputs: jnp.mean(method.loss_terms(p, x, inputs)["loss"])  # noqa: E731
    chosen = set(args.models.split(","))
    models = []
    if "histogram" in chosen:
        models.append(("histogram Bayes eps", None, _histogram_loss(histogram_probs(train_uint8)), False))
    if "random" in chosen:
        models.append(("network, random init", method.init_params(jax.random.PRNGKey(config.seed)), net_loss, True))
    if args.workdir and "trained" in chosen:
        config_w, method_w, params_w = load_params(args.workdir, args.step)
        if config_w.method != "vdm":
            raise SystemExit(f"error: --workdir={args.workdir} is a {config_w.method!r} run; this needs a VDM run.")
        loss_w = lambda p, x, inputs: jnp.mean(method_w.loss_terms(p, x, inputs)["loss"])  # noqa: E731
        step = args.step or checkpoint_steps(args.workdir)[-1]
        models.append((f"trained, step {step}", params_w, loss_w, True))
    rows = []
    start = time.time()
    for name, params, loss_fn, grads in models:
        t0 = time.time()
        m = method_w if name.startswith("trained") else method
        reps = args.reps if grads else args.hist_reps
        res = measure(m, params, loss_fn, data, reps, args.batch, args.seed, grads)
        rows.append(dict(summarise(name, res), seconds=time.time() - t0))
        print(f"{name}: {time.time() - t0:.1f} s", flush=True)
    print_table(rows)
    result = {
        "command": "python " + " ".join(sys.argv),
        "batch": args.batch,
        "reps": args.reps,
        "hist_reps": args.hist_reps,
        "models": args.models,
        "workdir": args.workdir,
        "machine": platform.node(),
        "jax_backend": jax.default_backend(),
        "load_average": os.getloadavg(),
        "wall_s": time.time() - start,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
