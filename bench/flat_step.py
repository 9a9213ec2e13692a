"""The train step with the tree state against the flat one (`optim.flatten`, issue 24), alternating
step for step in one process, and the op count of each compiled step.

    JAX_PLATFORMS=cpu python bench/flat_step.py [--parts digits,cifar10] [--pairs 20] [--cifar-pairs 6]

digits: the main job's step (configs/vdm.py, batch 128); cifar10: configs/cifar10.py at batch 8.
Both forms start from the same state and are fed back their own output (as the loop does). The
ratio of each pair (tree time / flat time: > 1 means the flat step is faster) is robust to the
load of a shared machine; the table gives their median and the load average. Op counts: the
compiled step's entry instructions that run as kernels (bench/cpu_op_profile.py's SKIP_OPS left
out), its fusions, and its selects and copies. XLA_FLAGS get ddpm_jax's CPU defaults (as
bench/run.py's parts). Then the state update alone (no network) per leaf, flat with a select per
vector (train_step's), and flat with a lax.cond. JSON goes to bench/results/flat_step.json (--out).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from ddpm_jax import xla_flags  # noqa: E402  (jax is not imported yet)

SKIP_OPS = {"parameter", "bitcast", "constant", "broadcast", "reshape", "tuple", "get-tuple-element"}
PARTS = {"digits": ("vdm", 128), "cifar10": ("cifar10", 8)}


def op_counts(hlo_text: str) -> dict[str, int]:
    """Kinds of the ENTRY computation's instructions (the ops XLA:CPU runs one by one)."""
    entry, kinds = False, collections.Counter()
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            entry = True
        elif entry and line.startswith("}"):
            break
        elif entry:
            op = re.search(r"= \S+ (\w[\w\-]*)\(", line)
            if op:
                kinds[op.group(1)] += 1
    ops = sum(n for k, n in kinds.items() if k not in SKIP_OPS)
    return {
        "ops": ops,
        "fusion": kinds["fusion"],
        "select": kinds["select"],
        "copy": kinds["copy"],
        "slice": kinds["slice"],
        "concatenate": kinds["concatenate"],
    }


def measure(part: str, pairs: int, seed: int = 0) -> dict:
    import jax
    import numpy as np

    from ddpm_jax import configuration, methods
    from ddpm_jax.training import train_lib

    name, batch_size = PARTS[part]
    config = configuration.load_config_file(name)
    config.training.batch_size = batch_size
    method = methods.from_config(config)
    tx = train_lib.make_optimizer(config)
    tree = train_lib.create_train_state(method, tx, jax.random.PRNGKey(seed))
    states = {"tree": tree, "flat": tree.to_flat()}
    size, ch = config.data.image_size, config.data.channels
    batch = jax.numpy.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch_size, size, size, ch)), np.float32)
    step = jax.jit(functools.partial(train_lib.train_step, method=method, config=config, axis_name=None))
    out = {"config": name, "batch": batch_size, "params": tree.to_flat().layout.size, "forms": {}}
    compiled = {}
    for form, state in states.items():
        t0 = time.perf_counter()
        compiled[form] = step.lower(state, batch).compile()
        out["forms"][form] = {"compile_s": time.perf_counter() - t0, **op_counts(compiled[form].as_text())}
        for _ in range(2):  # warm-up
            states[form], _ = compiled[form](states[form], batch)
        jax.block_until_ready(states[form])
    times = {"tree": [], "flat": []}
    load_before = os.getloadavg()
    for _ in range(pairs):
        for form in ("tree", "flat"):
            t0 = time.perf_counter()
            states[form], metrics = compiled[form](states[form], batch)
            jax.block_until_ready((states[form], metrics))
            times[form].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["tree"], times["flat"], strict=True)]
    # Same start, same batches: how far float order moved the flat run's params from the tree run's.
    a, b = (np.asarray(states["flat"].layout.ravel(s.params_tree()), np.float64) for s in states.values())
    out["params_rel_diff"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    out.update(
        pairs=pairs,
        load_avg_before=load_before,
        load_avg_after=os.getloadavg(),
        times=times,
        median_s={form: statistics.median(t) for form, t in times.items()},
        ratio_tree_over_flat_median=statistics.median(ratios),
        ratio_quartiles=statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
    )
    return out


def measure_update(part: str, reps: int, chunks: tuple[int, ...] = ()) -> dict:
    """The state update alone (clip + Adam + EMA + the NaN guard, no network) over the config's parameters:
    per leaf, flat with a select per vector (what train_step does), flat with a lax.cond instead, and the
    flat vector cut into chunks of each size in `chunks` (a list of vectors: does cache-sized work help?)."""
    import jax
    import jax.numpy as jnp
    import optax

    from ddpm_jax import configuration, methods
    from ddpm_jax.training import train_lib
    from ddpm_jax.training.flat_state import FlatLayout

    config = configuration.load_config_file(PARTS[part][0])
    params = methods.from_config(config).init_params(jax.random.PRNGKey(0))
    layout, tx = FlatLayout.of(params), train_lib.make_optimizer(config)

    def update(p, ema, opt, g, finite):
        u, new_opt = tx.update(g, opt, p)
        new_p = optax.apply_updates(p, u)
        new = (new_p, optax.incremental_update(new_p, ema, 1e-3), new_opt)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, (p, ema, opt))

    def update_cond(p, ema, opt, g, finite):
        return jax.lax.cond(finite, lambda: update(p, ema, opt, g, True), lambda: (p, ema, opt))

    grads = jax.tree_util.tree_map(lambda x: 0.01 * x + 1e-3, params)
    ok = jnp.bool_(True)
    tree_args = (params, params, tx.init(params), grads, ok)
    flat_p = layout.ravel(params)
    flat_args = (flat_p, flat_p, tx.init(flat_p), layout.ravel(grads), ok)
    fns = {
        "tree": (jax.jit(update), tree_args),
        "flat_select": (jax.jit(update), flat_args),
        "flat_cond": (jax.jit(update_cond), flat_args),
    }
    for size in chunks:
        cut = lambda v, size=size: [v[i : i + size] for i in range(0, v.shape[0], size)]
        chunked = cut(flat_p)
        fns[f"flat_chunks_{size}"] = (jax.jit(update), (chunked, chunked, tx.init(chunked), cut(flat_args[3]), ok))
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["tree"], times["flat_select"], strict=True)]
    return {
        "reps": reps,
        "load_avg": os.getloadavg(),
        "median_ms": {k: 1e3 * statistics.median(t) for k, t in times.items()},
        "ratio_tree_over_flat_select_median": statistics.median(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="digits,cifar10")
    ap.add_argument("--pairs", type=int, default=20, help="alternating pairs of the digits step")
    ap.add_argument("--cifar-pairs", type=int, default=6, help="alternating pairs of the cifar10 step")
    ap.add_argument("--update-reps", type=int, default=15, help="alternating reps of the update alone")
    ap.add_argument("--update-chunks", default="", help="chunk sizes for the update alone, e.g. 262144,4000000")
    ap.add_argument("--update-only", action="store_true", help="only the update alone (no train step)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "flat_step.json"))
    opts = ap.parse_args()
    os.environ["XLA_FLAGS"] = xla_flags.with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    import jax

    results = {
        "command": " ".join(sys.argv),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "xla_flags": os.environ["XLA_FLAGS"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parts": {},
    }
    for part in opts.parts.split(","):
        results["parts"][part] = (
            {} if opts.update_only else measure(part, opts.cifar_pairs if part == "cifar10" else opts.pairs)
        )
        chunks = tuple(int(c) for c in opts.update_chunks.split(",") if c)
        results["parts"][part]["update_only"] = measure_update(part, opts.update_reps, chunks)
        os.makedirs(os.path.dirname(opts.out), exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{'part':8} {'form':5} {'ops':>6} {'fusion':>6} {'select':>6} {'copy':>5} {'median s':>9}  ratio tree/flat")
    for part, r in results["parts"].items():
        for form in ("tree", "flat") if "forms" in r else ():
            c = r["forms"][form]
            ratio = (
                f"{r['ratio_tree_over_flat_median']:.3f} (load {r['load_avg_before'][0]:.1f})" if form == "flat" else ""
            )
            print(
                f"{part:8} {form:5} {c['ops']:6d} {c['fusion']:6d} {c['select']:6d} {c['copy']:5d} "
                f"{r['median_s'][form]:9.4f}  {ratio}"
            )
    for part, r in results["parts"].items():
        u = r["update_only"]
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in u["median_ms"].items())
        print(f"{part}: the update alone (clip + Adam + EMA + guard): {times} (load {u['load_avg'][0]:.1f})")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
