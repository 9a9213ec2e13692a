"""Where an XLA:CPU train step's time goes, by kind of op: a jax.profiler trace of a few steps,
each op event named back to what its fused computation contains (convolution, dot, reduce, or
elementwise only; run by YNNPACK or by XLA's own emitters), plus how many of the pool's threads
were busy at once.

    JAX_PLATFORMS=cpu python bench/cpu_op_profile.py [--config default] [--batch 128] [--steps 5]

XLA_FLAGS get ddpm_jax's CPU defaults (as bench/run.py's parts). The trace and the step's HLO
text go to --out (default bench/out/profile_<config>).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from ddpm_jax import xla_flags  # noqa: E402  (jax is not imported yet)

SKIP_OPS = {"parameter", "bitcast", "constant", "broadcast", "reshape", "tuple", "get-tuple-element"}


def fusion_kinds(hlo_text: str) -> dict[str, str]:
    """Fusion instruction name -> 'ynn|xla fusion with convolution|dot|reduce' or '... elementwise'."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(1), set())
        elif cur is not None and line.startswith("  "):
            op = re.search(r"= \S+ (\w[\w\-]*)\(", line)
            if op:
                cur.add(op.group(1))
    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s+%?([\w.\-]+) = .*? fusion\(.*calls=%?([\w.\-]+)", line)
        if not m:
            continue
        ops = comps.get(m.group(2), set()) - SKIP_OPS
        kind = next((f"fusion with {k}" for k in ("convolution", "dot", "reduce") if k in ops), "elementwise fusion")
        kinds[m.group(1)] = ("ynn " if m.group(1).startswith("ynn") else "xla ") + kind
    return kinds


def summarize(trace: str, hlo_text: str, steps: int) -> dict:
    import trace_summary

    events, _, threads = trace_summary.load_events(trace)
    kinds = fusion_kinds(hlo_text)
    pool = [
        e
        for e in events
        if "eigen" in threads.get((e["pid"], e.get("tid")), "").lower()
        and not e["name"].startswith(("ThunkExecutor", "ThreadpoolListener", "end:"))
    ]
    ms, calls = collections.Counter(), collections.Counter()
    for e in pool:
        kind = kinds.get(e["name"]) or re.sub(r"[.\d]+$", "", e["name"])
        ms[kind] += e["dur"] / 1e3 / steps
        calls[kind] += 1 / steps
    span = (max(e["ts"] + e["dur"] for e in pool) - min(e["ts"] for e in pool)) / 1e3 / steps
    busy_any = trace_summary.union_us([(e["ts"], e["ts"] + e["dur"]) for e in pool]) / 1e3 / steps
    return {
        "ops_per_step": len(pool) / steps,
        "span_ms_per_step": span,
        "op_ms_per_step_summed_over_threads": sum(ms.values()),
        "ms_with_any_op_running_per_step": busy_any,
        "mean_ops_running_at_once": sum(ms.values()) / busy_any,
        "by_kind": [{"kind": k, "ms_per_step": v, "ops_per_step": calls[k]} for k, v in ms.most_common()],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default", choices=("default", "cifar10"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = xla_flags.with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    import common

    out = args.out or os.path.join(HERE, "out", f"profile_{args.config}")
    cfg = common.get_config(args.config, batch=args.batch)
    r = common.bench_train(cfg, steps=args.steps, warmup=2, trace_dir=out, trace_steps=args.steps)
    with open(r["hlo"]) as f:
        s = summarize(r["trace"], f.read(), args.steps)
    print(
        f"{args.config}, batch {args.batch}: untraced step {1e3 * r['step_median_s']:.0f} ms (median of "
        f"{args.steps}); traced: {s['ops_per_step']:.0f} ops per step, span {s['span_ms_per_step']:.0f} ms, "
        f"ops running {s['ms_with_any_op_running_per_step']:.0f} ms of it, "
        f"{s['op_ms_per_step_summed_over_threads']:.0f} op-ms summed over the pool's threads "
        f"(mean {s['mean_ops_running_at_once']:.2f} ops at once)"
    )
    for row in s["by_kind"][:16]:
        print(f"  {row['ms_per_step']:8.1f} ms/step {row['ops_per_step']:7.0f} ops/step  {row['kind']}")
    print(f"trace: {r['trace']}")


if __name__ == "__main__":
    main()
