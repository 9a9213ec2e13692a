"""GPU benchmark (called by bench/gpu.sh): the cifar10 config at global batch 128, f32 and bf16.

Measures, for each compute dtype: steps/s, images/s, MFU (model FLOPs over the card's dense
peak: XLA:GPU's cost analysis misses the cuDNN convolutions, so the FLOPs are XLA:CPU's count of
the same jitted fwd+bwd, --model-gflops, from bench/run.py), compile time and memory of the pmapped train_step on a synthetic
device-resident batch (and, for comparison, fed a fresh host batch each step as ddpm_jax.training.loop
does); then ancestral-sampling and DDIM throughput at batch 256. Measured matmul ceilings of the
card are printed alongside. Results go to --out (JSON, rewritten after every item, so a
timeout keeps what was done) and a Markdown table is printed last.

  python bench/gpu_bench.py --out $OUT/gpu.json          # on the GPU (see bench/gpu.sh)
  python bench/gpu_bench.py --smoke --out /tmp/g.json    # a tiny CPU dry run of the same code
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import trace_summary  # noqa: E402

START = time.perf_counter()

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's datasheets. XLA on GPU runs float32
# convolutions and dots in TF32 unless jax_default_matmul_precision says "highest" (checked below by
# timing an f32 matmul at default and at HIGHEST precision), so the f32 MFU is taken against TF32.
PEAKS = {  # device_kind substring -> (bf16 dense, tf32 dense)
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.4, 494.7),  # SXM / HBM3
    "H200": (989.4, 494.7),
    "A100": (312.0, 156.0),
}


def peaks_for(kind: str):
    for key, val in PEAKS.items():
        if key in kind:
            return key, val
    return None, (None, None)


def elapsed() -> float:
    return time.perf_counter() - START


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(common.REPO, "bench", "out", "gpu.json"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sample-n", type=int, default=256)
    ap.add_argument(
        "--sample-t",
        type=int,
        default=250,
        help="ancestral steps actually run; T=1000 is extrapolated linearly (same per-step work)",
    )
    ap.add_argument("--budget-s", type=float, default=440.0, help="skip the remaining items past this")
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes, for a CPU dry run")
    ap.add_argument(
        "--model-gflops",
        type=float,
        default=35.0075,
        help="cifar10 UNet fwd+bwd GFLOP/image (XLA:CPU cost analysis), used where the GPU's is missing",
    )
    ap.add_argument("--only", default="", help="comma-separated item names to run (default: all)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override for every item, e.g. --set optim.flatten=True (repeatable)",
    )
    ap.add_argument(
        "--no-trace", action="store_true", help="skip the profile of the bf16 step (a Perfetto trace next to --out)"
    )
    args = ap.parse_args()

    res = {"env": common.env_info(), "args": vars(args), "items": {}, "errors": {}}
    kind = res["env"]["device_kind"]
    res["peak_key"], (bf16_peak, tf32_peak) = peaks_for(kind)
    res["peak_tflops"] = {"bfloat16": bf16_peak, "float32(tf32)": tf32_peak}
    print("env:", res["env"], flush=True)

    def save():
        res["elapsed_s"] = elapsed()
        common.dump(args.out, res)

    def cfg_for(dtype):
        cfg = common.get_config("cifar10", batch=8 if args.smoke else args.batch, dtype=dtype)
        if args.smoke:
            cfg.model.ch, cfg.model.num_groups, cfg.model.ch_mult = 16, 4, (1, 2)
        for override in args.set:
            field, value = override.split("=", 1)
            *parents, leaf = field.split(".")
            node = cfg
            for name in parents:
                node = node[name]
            node[leaf] = ast.literal_eval(value)
        return cfg

    def item(name, fn, *, need_s):
        if args.only and name not in args.only.split(","):
            return None
        if elapsed() + need_s > args.budget_s:
            print(
                f"[skip] {name}: {elapsed():.0f}s elapsed, needs ~{need_s:.0f}s of a {args.budget_s:.0f}s budget",
                flush=True,
            )
            res["errors"][name] = "skipped (time budget)"
            return None
        t0 = time.perf_counter()
        print(f"[run ] {name} (t={elapsed():.0f}s)", flush=True)
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - keep going, record it
            traceback.print_exc()
            res["errors"][name] = repr(e)[:2000]
            save()
            return None
        out = dict(out, wall_s=time.perf_counter() - t0)
        res["items"][name] = out
        print(
            f"[done] {name} in {out['wall_s']:.1f}s: "
            + ", ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float) and "times" not in k),
            flush=True,
        )
        save()
        return out

    n_mm = 512 if args.smoke else 8192

    def matmuls():
        out = {}
        out["bf16"] = common.matmul_gflops(n_mm, 10, jnp.bfloat16)
        out["f32_default"] = common.matmul_gflops(n_mm, 10, jnp.float32)
        with jax.default_matmul_precision("highest"):
            out["f32_highest"] = common.matmul_gflops(n_mm, 5, jnp.float32)
        out["f32_default_uses_tf32"] = out["f32_default"]["gflops"] > 1.5 * out["f32_highest"]["gflops"]
        out["copy"] = common.copy_bandwidth(1 << (20 if args.smoke else 30))
        return {
            "copy_gb_per_s": out["copy"]["gb_per_s"],
            "matmul": out,
            "bf16_tflops": out["bf16"]["gflops"] / 1e3,
            "f32_default_tflops": out["f32_default"]["gflops"] / 1e3,
            "f32_highest_tflops": out["f32_highest"]["gflops"] / 1e3,
        }

    item("matmul", matmuls, need_s=20)
    item("flops", lambda: common.model_flops(cfg_for("float32"), 8, compile=False), need_s=20)
    if "flops" in res["items"] and not res["items"]["flops"].get("fwd_bwd_flops_per_image"):
        res["items"].pop("flops")
    fl = res["items"].get("flops", {}).get("fwd_bwd_flops_per_image")
    if not fl and not args.smoke:
        # XLA:GPU's cost analysis misses the cuDNN convolutions (custom calls): its train-step count
        # was 0.68 GFLOP/image in f32 against 35.0 from XLA:CPU's analysis of the same jitted fwd+bwd.
        fl = args.model_gflops * 1e9
        res["flops_source"] = f"--model-gflops {args.model_gflops} (XLA:CPU cost analysis, bench/run.py)"
    res["fwd_bwd_flops_per_image_used"] = fl

    out_dir = os.path.dirname(os.path.abspath(args.out))

    def add_mfu(r, peak):
        if fl:
            r["model_tflops_per_s"] = fl * r["images_per_s"] / 1e12
            r["mfu_pct"] = 100.0 * r["model_tflops_per_s"] / peak if peak else None
            if "pipelined_images_per_s" in r:
                r["pipelined_mfu_pct"] = 100.0 * fl * r["pipelined_images_per_s"] / 1e12 / peak if peak else None
        return r

    for dtype in ("bfloat16", "float32"):

        def train(dtype=dtype):
            profile = dtype == "bfloat16" and not args.no_trace
            r = common.bench_train(
                cfg_for(dtype),
                steps=3 if args.smoke else args.steps,
                warmup=3,
                host_batch_steps=2 if args.smoke else 10,
                pipelined=True,
                trace_dir=os.path.join(out_dir, "trace_tmp") if profile else None,
            )
            if r.get("trace"):  # $OUT returns files at most two folders down: move it up
                dst = os.path.join(out_dir, f"trace_train_{dtype}.json.gz")
                shutil.move(r["trace"], dst)
                shutil.rmtree(os.path.join(out_dir, "trace_tmp"), ignore_errors=True)
                r["trace"] = dst
                try:
                    r["trace_summary"] = trace_summary.summarize(dst, r["trace_steps"], top=25)
                    trace_summary.print_summary(r["trace_summary"])
                except Exception as e:  # noqa: BLE001 - the timings still count; the trace file is there
                    traceback.print_exc()
                    r["trace_summary_error"] = repr(e)
            return add_mfu(r, bf16_peak if dtype == "bfloat16" else tf32_peak)

        item(f"train_{dtype}", train, need_s=30 if args.smoke else 110)  # ~100 s each on an H200

    def train_b256():
        cfg = cfg_for("bfloat16")
        cfg.training.batch_size = 16 if args.smoke else 2 * args.batch
        return add_mfu(common.bench_train(cfg, steps=3 if args.smoke else 20, warmup=3, pipelined=True), bf16_peak)

    for dtype in ("bfloat16", "float32"):
        n = 4 if args.smoke else args.sample_n
        t = 5 if args.smoke else args.sample_t
        item(
            f"sample_{dtype}",
            lambda dtype=dtype, n=n, t=t: common.bench_sampling(cfg_for(dtype), n=n, t_steps=t, ddim_steps=50, reps=2),
            need_s=30 if args.smoke else 60,
        )  # ~40 s each on an H200

    item("train_bfloat16_b256", train_b256, need_s=30 if args.smoke else 100)  # ~95 s on an H200
    save()
    print_table(res)
    save()


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def print_table(res):
    it = res["items"]
    env = res["env"]
    print()
    print(
        f"device: {env['device_kind']} ({env['backend']}), jax {env['jax']}, flax {env.get('flax')}, "
        f"peaks used: bf16 {res['peak_tflops']['bfloat16']} / tf32 {res['peak_tflops']['float32(tf32)']} TFLOP/s"
    )
    if "matmul" in it:
        m = it["matmul"]
        print(
            f"measured matmul 8192^3: bf16 {m['bf16_tflops']:.0f} TFLOP/s, f32 default {m['f32_default_tflops']:.0f}, "
            f"f32 highest {m['f32_highest_tflops']:.0f} (default uses TF32: {m['matmul']['f32_default_uses_tf32']}); "
            f"copy {m['copy_gb_per_s']:.0f} GB/s (read+write)"
        )
    if "flops" in it and it["flops"].get("fwd_flops_per_image"):
        f = it["flops"]
        print(
            f"model FLOPs/image (XLA cost analysis): fwd {f['fwd_flops_per_image'] / 1e9:.2f} G, "
            f"fwd+bwd {f['fwd_bwd_flops_per_image'] / 1e9:.2f} G"
        )
    print()
    print(
        "| cifar10, global batch | dtype | steps/s | images/s | model TFLOP/s | MFU % | compile s | "
        "XLA peak MB | host-batch img/s | step ms | XLA bytes / copy BW ms | pipelined steps/s | pipelined MFU % "
        "| dispatch ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bw = it.get("matmul", {}).get("copy_gb_per_s")
    for name, dtype in (
        ("train_float32", "float32"),
        ("train_bfloat16", "bfloat16"),
        ("train_bfloat16_b256", "bfloat16"),
    ):
        r = it.get(name)
        if r:
            floor = (
                r["train_step_bytes_accessed"] / (bw * 1e9) * 1e3 if bw and r.get("train_step_bytes_accessed") else None
            )
            r["bytes_floor_ms"] = floor
            print(
                f"| {r['global_batch']} | {dtype} | {r['steps_per_s']:.1f} | {r['images_per_s']:.0f} | "
                f"{fmt(r.get('model_tflops_per_s'), '.0f')} | {fmt(r.get('mfu_pct'), '.1f')} | "
                f"{r['lower_s'] + r['compile_s']:.0f} | {r['xla_memory'].get('peak_estimate_mb', 0):.0f} | "
                f"{fmt(r.get('host_batch_images_per_s'), '.0f')} | {1e3 * r['step_median_s']:.1f} | "
                f"{fmt(floor, '.1f')} | {fmt(r.get('pipelined_steps_per_s'), '.1f')} | "
                f"{fmt(r.get('pipelined_mfu_pct'), '.1f')} | "
                f"{fmt(1e3 * r['pipelined_dispatch_s_per_step'] if 'pipelined_dispatch_s_per_step' in r else None, '.2f')} |"
            )
    print()
    print(
        "| sampling | dtype | N | T run | step ms | net-alone ms | loop overhead % | sampler's own ms (isolated) | "
        "img/s at T=1000 | DDIM-50 img/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        r = it.get(f"sample_{dtype}")
        if r:
            print(
                f"| ancestral | {dtype} | {r['n']} | {r['T']} | {r['ancestral_step_ms']:.2f} | "
                f"{r['net_eval_ms']:.2f} | {r['overhead_pct']:.1f} | {r['sampler_own_ms']:.3f} | "
                f"{r['ancestral_T1000_images_per_s']:.1f} | "
                f"{fmt(r.get('ddim_images_per_s'), '.0f')} |"
            )
    if res["errors"]:
        print("\nerrors/skips:", res["errors"])
    print(f"\ntotal {res.get('elapsed_s', elapsed()):.0f}s")


if __name__ == "__main__":
    main()
