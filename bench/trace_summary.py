"""Where a profiled train step's device time goes, from a jax.profiler Perfetto trace.

    python bench/trace_summary.py TRACE.json.gz --steps 3 [--top 30]

Reads the trace `jax.profiler.trace(dir, create_perfetto_trace=True)` writes (bench_train's
trace_dir does that for a few pipelined steps). For every thread it reports the events, their
summed time, the busy time (union of the event intervals) and the span from the first event to
the last. The device's kernels are those on the GPU streams (on XLA:CPU, the Eigen pool's
threads, where the grouping below means little): busy / span is how full the device was kept,
span - busy the idle gaps (launch latency, host dispatch). Kernels are grouped by kind (cuDNN
convolutions by direction, GEMMs, XLA's fusions by emitter) and one step is cut into phases at its
first and last convolution.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def load_events(path: str) -> tuple[list, dict, dict]:
    """Complete ('X') events plus pid -> process name and (pid, tid) -> thread name."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    return [e for e in events if e.get("ph") == "X" and "dur" in e], procs, threads


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def kernel_kind(name: str) -> str:
    """A coarse kind from a GPU kernel's name: cuDNN convolutions by direction, GEMMs, and XLA's
    fusions by their emitter (XLA names them input_reduce_fusion_12, loop_add_fusion_3, ...)."""
    low = name.lower()
    if "xmma" in low or "implicit_gemm" in low or "cudnn" in low or "cask" in low:
        for direction in ("fprop", "dgrad", "wgrad"):
            if direction in low:
                return "conv " + direction
        return "conv (other cuDNN)"
    if "nvjet" in low or "gemm" in low or "cutlass" in low:
        return "gemm (dense, attention)"
    for key, kind in (
        ("transpose", "transpose fusion"),
        ("reduce", "reduction fusion"),
        ("concatenate", "concatenate"),
        ("memcpy", "memcpy"),
        ("memset", "memset"),
    ):
        if key in low:
            return kind
    return "elementwise (loop) fusion" if low.startswith("loop_") else "other"


def summarize(path: str, steps: int = 1, top: int = 30) -> dict:
    events, procs, threads = load_events(path)
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e.get("tid"))].append(e)
    lines = []
    for (pid, tid), evs in by_thread.items():
        start = min(e["ts"] for e in evs)
        end = max(e["ts"] + e["dur"] for e in evs)
        lines.append(
            {
                "process": procs.get(pid, str(pid)),
                "thread": threads.get((pid, tid), str(tid)),
                "events": len(evs),
                "sum_ms": sum(e["dur"] for e in evs) / 1e3,
                "busy_ms": union_us([(e["ts"], e["ts"] + e["dur"]) for e in evs]) / 1e3,
                "span_ms": (end - start) / 1e3,
                "key": (pid, tid),
            }
        )
    lines.sort(key=lambda r: -r["busy_ms"])
    # The kernels: GPU stream threads if there are any (not the derived "XLA Ops"/"Modules" lines).
    device = [r for r in lines if "gpu" in r["process"].lower() and "stream" in r["thread"].lower()]
    if not device:  # XLA:CPU: its ops run on the Eigen pool's threads
        device = [r for r in lines if "eigen" in r["thread"].lower()] or lines[:1]
    kernels = [e for r in device for e in by_thread[r["key"]]]
    out = {"steps": steps, "device_threads": [r["process"] + " / " + r["thread"] for r in device]}
    if kernels:
        span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3
        busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / 1e3
        out.update(
            kernels_per_step=len(kernels) / steps,
            span_ms_per_step=span / steps,
            busy_ms_per_step=busy / steps,
            busy_pct_of_span=100.0 * busy / span if span else None,
            mean_kernel_us=1e3 * busy / len(kernels),
        )
    ms, calls = collections.Counter(), collections.Counter()  # keyed by ("name", name) and ("kind", kind)
    for e in kernels:
        for key in (("name", e["name"]), ("kind", kernel_kind(e["name"]))):
            ms[key] += e["dur"] / 1e3 / steps
            calls[key] += 1

    def ranked(group, label, n=None):
        rows = [(k, v) for k, v in ms.most_common() if k[0] == group][:n]
        return [{label: k[1], "ms_per_step": v, "calls_per_step": calls[k] / steps} for k, v in rows]

    out["top"] = ranked("name", "name", top)
    out["by_kind"] = ranked("kind", "kind")
    # Phases of one step (the first): before the first convolution (timestep/noise draws, time
    # embedding), forward + backward, and after the last convolution (optimizer, EMA, guard).
    kernels.sort(key=lambda e: e["ts"])
    first = kernels[: len(kernels) // steps] if kernels else []
    convs = [i for i, e in enumerate(first) if kernel_kind(e["name"]).startswith("conv")]
    if convs:
        bounds = {
            "before first conv": first[: convs[0]],
            "forward + backward": first[convs[0] : convs[-1] + 1],
            "after last conv": first[convs[-1] + 1 :],
        }
        out["phases"] = [
            {
                "phase": k,
                "kernels": len(v),
                "busy_ms": sum(e["dur"] for e in v) / 1e3,
                "span_ms": (v[-1]["ts"] + v[-1]["dur"] - v[0]["ts"]) / 1e3 if v else 0.0,
            }
            for k, v in bounds.items()
        ]
    out["threads"] = [{k: v for k, v in r.items() if k != "key"} for r in lines[:12]]
    return out


def print_summary(s: dict) -> None:
    print("threads (busiest first): events, summed ms, busy ms, span ms")
    for r in s["threads"]:
        print(
            f"  {r['process'][:40]:40s} {r['thread'][:40]:40s} {r['events']:7d} {r['sum_ms']:9.1f} "
            f"{r['busy_ms']:9.1f} {r['span_ms']:9.1f}"
        )
    if "busy_ms_per_step" in s:
        print(
            f"device kernels per step: {s['kernels_per_step']:.0f}, busy {s['busy_ms_per_step']:.2f} ms of a "
            f"{s['span_ms_per_step']:.2f} ms span ({s['busy_pct_of_span']:.1f}%), "
            f"mean kernel {s['mean_kernel_us']:.1f} us"
        )
    for r in s.get("by_kind", []):
        print(f"  {r['ms_per_step']:8.2f} ms/step {r['calls_per_step']:7.0f} kernels  {r['kind']}")
    for r in s.get("phases", []):
        print(
            f"  phase {r['phase']:20s} {r['kernels']:6d} kernels, busy {r['busy_ms']:.2f} ms, span {r['span_ms']:.2f} ms"
        )
    print("top kernels:")
    for r in s["top"]:
        print(f"  {r['ms_per_step']:8.2f} ms/step {r['calls_per_step']:5.0f} calls  {r['name'][:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="how many steps the trace holds (per-step numbers)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print_summary(summarize(args.trace, args.steps, args.top))


if __name__ == "__main__":
    main()
