"""CPU benchmark set for ddpm_jax, side by side with a PyTorch (diffusers) reference.

  python bench/run.py                 # full CPU set (< 20 min on 2 cores); table + bench/out/cpu.json
  python bench/run.py --quick         # fewer steps / smaller sampling, a few minutes
  python bench/run.py --skip-torch    # JAX part only

Each part runs in its own subprocess (a clean peak RSS per part, and a forced device count for
the scaling part), one after another:

  matmul    measured f32 matmul rate (jnp.dot and torch.mm, 2048^3): the "machine peak" here
  default   pmapped train_step, default config (8x8x1 digits UNet), global batch 128, 1 device;
            XLA FLOPs of the jitted fwd+bwd; ancestral sampling vs network alone, DDIM 50
  scaling2  the same train_step with XLA_FLAGS=--xla_force_host_platform_device_count=2
  cifar10   pmapped train_step, cifar10 config (35.7M UNet), batch 8, and the PyTorch reference:
            diffusers UNet2DModel of the same shape + DDPMScheduler + Adam (+ grad clip, EMA),
            batch 8, torch.set_num_threads(2), its timed steps alternating one for one with the
            JAX ones (both sides see the same background load); XLA FLOPs; PyTorch's no-grad
            forward at the sampling batch
  cifar10_sampling  ancestral sampling (short T, extrapolated) vs network alone, DDIM 50

The last line is `ratio ddpm_jax/pytorch train img/s: R (cifar10 config, batch 8)`.
Batches are synthetic (uniform in [-1, 1]); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
THREADS = 2  # this machine's cores; PyTorch gets the same
sys.path.insert(0, REPO)
from ddpm_jax import xla_flags  # noqa: E402  (sets nothing on import; jax is not imported)

# ----------------------------------------------------------------------------- parts (subprocesses)


def part_matmul(opts) -> dict:
    import common

    out = {"jax_f32": common.matmul_gflops(2048, 10)}
    try:
        import torch

        torch.set_num_threads(THREADS)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        torch.mm(a, b)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t0)
        out["torch_f32"] = {
            "n": 2048,
            "median_s": statistics.median(ts),
            "gflops": 2 * 2048**3 / statistics.median(ts) / 1e9,
            "gflops_best": 2 * 2048**3 / min(ts) / 1e9,
        }
    except ImportError:
        pass
    out["env"] = common.env_info()
    return out


def part_default(opts) -> dict:
    import common

    cfg = common.get_config("default", batch=128)
    out = {"env": common.env_info()}
    out["train"] = common.bench_train(cfg, steps=opts.default_steps, warmup=2, host_batch_steps=5)
    out["flops"] = common.model_flops(cfg, 128, compile=True)
    out["sampling"] = common.bench_sampling(cfg, n=64, t_steps=opts.default_sample_t, ddim_steps=50, reps=2)
    out["maxrss_mb"] = common.maxrss_mb()
    return out


def part_scaling2(opts) -> dict:
    import common
    import jax

    assert jax.local_device_count() == 2, jax.local_devices()
    cfg = common.get_config("default", batch=128)
    return {"env": common.env_info(), "train": common.bench_train(cfg, steps=opts.default_steps, warmup=2)}


def part_cifar10(opts) -> dict:
    """ddpm_jax's pmapped train_step on the cifar10 config at batch 8, and (unless --skip-torch or
    torch is missing) the PyTorch reference, their timed steps alternating one for one, so that
    both sides see the same background load on this shared machine."""
    import common

    cfg = common.get_config("cifar10", batch=8)
    out = {"env": common.env_info()}
    ref = None
    if not opts.skip_torch:
        try:
            ref = TorchReference()
        except ImportError as e:
            out["torch_skipped"] = repr(e)
    if ref is not None:
        ref.warmup()
    out["train"] = common.bench_train(
        cfg, steps=opts.cifar_steps, warmup=1, between=None if ref is None else ref.timed_step
    )
    if ref is not None:
        out["torch"] = ref.results(opts.cifar_sample_n)
    out["flops"] = common.model_flops(cfg, 8, compile=bool(opts.cifar_flops_compile))
    out["maxrss_mb"] = common.maxrss_mb()
    return out


def part_cifar10_sampling(opts) -> dict:
    import common

    cfg = common.get_config("cifar10")
    return {
        "env": common.env_info(),
        "sampling": common.bench_sampling(
            cfg, n=opts.cifar_sample_n, t_steps=opts.cifar_sample_t, ddim_steps=50, ddim_n=opts.cifar_ddim_n, reps=1
        ),
    }


def torch_unet():
    """diffusers' UNet2DModel in the shape of configs/cifar10.py's UNet (ch 128, ch_mult (1,2,2,2),
    2 res blocks, single-head attention at 16x16 and in the middle, GroupNorm 32, dropout 0.1)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=256,  # one head of 256 channels, as in the DDPM UNet
        norm_num_groups=32,
        norm_eps=1e-6,
        dropout=0.1,
        downsample_padding=1,
        time_embedding_type="positional",
        add_attention=True,
    )


class TorchReference:
    """diffusers' UNet2DModel + DDPMScheduler + Adam (+ grad clip and diffusers' EMAModel, as the
    JAX step has both), batch 8 on 2 threads: a PyTorch user's training step for the same model."""

    def __init__(self, batch: int = 8):
        import torch
        from diffusers import DDPMScheduler
        from diffusers import __version__ as diffusers_version
        from diffusers.training_utils import EMAModel

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        self.torch, self.versions = torch, {"torch": torch.__version__, "diffusers": diffusers_version}
        self.model = torch_unet()
        self.sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        self.ema = EMAModel(self.model.parameters(), decay=0.9999)
        self.b = batch
        self.x = torch.rand(batch, 3, 32, 32) * 2 - 1
        self.times: list[float] = []
        self.first_step_s = None

    def step(self) -> float:
        import torch.nn.functional as F

        torch = self.torch
        noise = torch.randn_like(self.x)
        t = torch.randint(0, 1000, (self.b,))
        noisy = self.sched.add_noise(self.x, noise, t)
        loss = F.mse_loss(self.model(noisy, t).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.step(self.model.parameters())
        return float(loss)

    def warmup(self):
        self.model.train()
        t0 = time.perf_counter()
        self.step()
        self.first_step_s = time.perf_counter() - t0
        self.step()

    def timed_step(self):
        t0 = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - t0)

    def results(self, n_fwd: int) -> dict:
        import resource

        torch = self.torch
        med = statistics.median(self.times)
        train = {
            "params": sum(p.numel() for p in self.model.parameters()),
            "global_batch": self.b,
            "first_step_s": self.first_step_s,
            "step_times_s": self.times,
            "step_median_s": med,
            "images_per_s": self.b / med,
            "images_per_s_best": self.b / min(self.times),
            "threads": torch.get_num_threads(),
        }
        # The sampler's unit of work: a no-grad forward at the sampling batch.
        self.model.eval()
        xs = torch.randn(n_fwd, 3, 32, 32)
        ft = []
        with torch.no_grad():
            _ = self.model(xs, torch.full((n_fwd,), 500)).sample  # warm-up
            for i in range(3):
                t0 = time.perf_counter()
                _ = self.model(xs, torch.full((n_fwd,), 999 - i)).sample
                ft.append(time.perf_counter() - t0)
        return dict(
            self.versions,
            train=train,
            fwd_n=n_fwd,
            fwd_ms=1e3 * min(ft),
            fwd_times_s=ft,
            maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        )


PARTS = {
    "matmul": part_matmul,
    "default": part_default,
    "scaling2": part_scaling2,
    "cifar10": part_cifar10,
    "cifar10_sampling": part_cifar10_sampling,
}


# ----------------------------------------------------------------------------- driver


def run_part(name: str, opts, outdir: str) -> dict:
    path = os.path.join(outdir, f"part_{name}.json")
    if os.path.exists(path):
        os.remove(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["JAX_PLATFORMS"] = "cpu"
    # Flags must be set before jax starts its backend: hence a subprocess per part.
    flags = "--xla_force_host_platform_device_count=2" if name == "scaling2" else ""
    env["XLA_FLAGS"] = flags if opts.xla_cpu_ynn_convs else xla_flags.with_cpu_defaults(flags)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--part-out", path] + opts.passthrough
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] part {name} ...", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(path):
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  part {name} FAILED (rc {proc.returncode}) after {wall:.0f}s:\n{tail}", flush=True)
        return {"error": tail, "rc": proc.returncode, "wall_s": wall}
    with open(path) as f:
        res = json.load(f)
    res["wall_s"], res["loadavg_1m_before"], res["loadavg_1m_after"] = wall, load0, os.getloadavg()[0]
    print(f"  done in {wall:.0f}s (load avg {load0:.1f} -> {res['loadavg_1m_after']:.1f})", flush=True)
    return res


def fmt(v, spec=".3g", none="-"):
    return none if v is None else format(v, spec)


def table(R: dict) -> str:
    L = []
    mm = R.get("matmul", {})
    jax_peak = mm.get("jax_f32", {}).get("gflops")
    torch_peak = mm.get("torch_f32", {}).get("gflops")
    env = mm.get("env") or R.get("default", {}).get("env") or {}
    ref = R.get("cifar10", {}).get("torch") or {}
    L.append(
        f"Machine: {env.get('cpu_count')} CPUs, jax {env.get('jax')} ({env.get('backend')}), flax "
        f"{env.get('flax')}; torch {ref.get('torch', '-')}, diffusers "
        f"{ref.get('diffusers', '-')}. Measured f32 matmul 2048^3: jnp.dot "
        f"{fmt(jax_peak, '.0f')} GFLOP/s, torch.mm {fmt(torch_peak, '.0f')} GFLOP/s."
    )
    L.append("")
    L.append(
        "| train (synthetic batch) | impl | devices | batch | params | compile s | step s (median) | img/s "
        "| GFLOP/img fwd+bwd (XLA) | achieved GFLOP/s | % of matmul rate | XLA mem est. MB | peak RSS MB |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def row(label, impl, part, flops_from=None, torch_row=False):
        p = R.get(part)
        if torch_row:
            p = (p or {}).get("torch")
        tr = (p or {}).get("train")
        if not tr:
            why = "not run" if p is None else "failed"
            L.append(f"| {label} | {impl} | | | | | | | | | | | {why} |")
            return
        fl = (R.get(flops_from or part, {}).get("flops") or {}).get("fwd_bwd_flops_per_image")
        ach = None if fl is None else fl * tr["images_per_s"] / 1e9
        peak = torch_peak if torch_row else jax_peak
        compile_s = tr.get("first_step_s") if torch_row else tr["lower_s"] + tr["compile_s"]
        mem = None if torch_row else tr["xla_memory"].get("peak_estimate_mb")
        L.append(
            f"| {label} | {impl} | {tr.get('devices', 1)} | {tr['global_batch']} | {tr['params'] / 1e6:.2f}M | "
            f"{fmt(compile_s, '.1f')}{' (1st step)' if torch_row else ''} | {tr['step_median_s']:.3f} | "
            f"{tr['images_per_s']:.1f} | {fmt(None if fl is None else fl / 1e9, '.3f')} | {fmt(ach, '.1f')} | "
            f"{fmt(None if ach is None or not peak else 100 * ach / peak, '.0f')} | {fmt(mem, '.0f')} | "
            f"{'(same process)' if torch_row else fmt(p.get('maxrss_mb') or tr.get('maxrss_mb'), '.0f')} |"
        )

    row("default (digits 8x8)", "ddpm_jax", "default")
    row("default (digits 8x8)", "ddpm_jax", "scaling2", flops_from="default")
    row("cifar10 (32x32x3)", "ddpm_jax", "cifar10")
    row("cifar10 (32x32x3)", "PyTorch diffusers", "cifar10", torch_row=True)
    L.append("")
    jt, pt = R.get("cifar10", {}).get("train"), ref.get("train")
    if jt and pt:
        pairs = [b / a for a, b in zip(jt["step_times_s"], pt["step_times_s"])]
        L.append(
            f"cifar10, batch 8: the two sides' timed steps alternate one for one; median of the per-pair "
            f"ratios (PyTorch step s / ddpm_jax step s) = {statistics.median(pairs):.2f} "
            f"(pairs: {', '.join(f'{x:.2f}' for x in pairs)})."
        )
    d1, d2 = R.get("default", {}).get("train"), R.get("scaling2", {}).get("train")
    if d1 and d2:
        L.append(
            f"Scaling, default config at batch 128: 2 forced CPU devices / 1 device = "
            f"{d2['images_per_s'] / d1['images_per_s']:.2f}x images/s."
        )
    if d1 and d1.get("host_batch_images_per_s"):
        L.append(
            f"Default config with a fresh host batch put on the device every step: "
            f"{d1['host_batch_images_per_s']:.0f} img/s (vs {d1['images_per_s']:.0f} device-resident)."
        )
    L.append("")
    L.append(
        "| sampling | N | T run | ancestral ms/step | network alone ms/step | loop overhead % | "
        "sampler's own ms/step (% of network), isolated | "
        "ancestral img/s at T=1000 (extrapolated) | DDIM-50: N, s, img/s | PyTorch no-grad fwd ms at N |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for label, part in (("default (digits)", "default"), ("cifar10", "cifar10_sampling")):
        s = R.get(part, {}).get("sampling")
        if not s:
            L.append(f"| {label} | | | | | | | | | {'not run' if part not in R else 'failed'} |")
            continue
        tfwd = ref.get("fwd_ms") if part == "cifar10_sampling" else None
        L.append(
            f"| {label} | {s['n']} | {s['T']} | {s['ancestral_step_ms']:.1f} | {s['net_eval_ms']:.1f} | "
            f"{s['overhead_pct']:+.1f} | {s['sampler_own_ms']:.2f} ({s['sampler_own_pct']:+.1f}%) | "
            f"{s['ancestral_T1000_images_per_s']:.3g} | "
            f"{s.get('ddim_n', '-')}, {fmt(s.get('ddim_s'), '.1f')}, {fmt(s.get('ddim_images_per_s'), '.3g')} | "
            f"{fmt(tfwd, '.0f')} |"
        )
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and a smaller sampling set")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument(
        "--xla-cpu-ynn-convs",
        action="store_true",
        help="XLA's own default (YNNPACK convolutions) instead of ddpm_jax's xla_flags defaults",
    )
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--out", default=os.path.join(HERE, "out", "cpu.json"))
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--default-steps", type=int, default=None)
    ap.add_argument("--default-sample-t", type=int, default=None)
    ap.add_argument("--cifar-steps", type=int, default=None)
    ap.add_argument("--cifar-sample-n", type=int, default=None)
    ap.add_argument("--cifar-sample-t", type=int, default=None)
    ap.add_argument("--cifar-ddim-n", type=int, default=None)
    ap.add_argument(
        "--cifar-flops-compile",
        type=int,
        default=None,
        help="1: FLOPs of the compiled fwd+bwd (another compile); 0: of the lowered module",
    )
    opts = ap.parse_args()
    defaults = dict(
        default_steps=(8, 20),
        default_sample_t=(50, 200),
        cifar_steps=(2, 5),
        cifar_sample_n=(2, 4),
        cifar_sample_t=(5, 20),
        cifar_ddim_n=(1, 2),
        cifar_flops_compile=(0, 1),
    )
    opts.passthrough = ["--skip-torch"] if opts.skip_torch else []
    for k, (quick, full) in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, quick if opts.quick else full)
        opts.passthrough += [f"--{k.replace('_', '-')}", str(getattr(opts, k))]

    if opts.part:  # inside a subprocess
        sys.path.insert(0, HERE)
        res = PARTS[opts.part](opts)
        with open(opts.part_out, "w") as f:
            json.dump(res, f, indent=1, default=float)
        return

    outdir = os.path.dirname(os.path.abspath(opts.out))
    os.makedirs(outdir, exist_ok=True)
    have_torch = True
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        have_torch = False
        print(f"PyTorch reference skipped: {e} (pip install -e '.[bench]')", flush=True)
    t_start = time.perf_counter()
    R = {
        "opts": {k: v for k, v in vars(opts).items() if k != "passthrough"},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if not have_torch and "--skip-torch" not in opts.passthrough:
        opts.passthrough.append("--skip-torch")
    for name in opts.parts.split(","):
        if name not in PARTS:
            raise SystemExit(f"unknown part {name!r}; choose from {', '.join(PARTS)}")
        R[name] = run_part(name, opts, outdir)
        R["total_s"] = time.perf_counter() - t_start
        common_dump(opts.out, R)
    R["total_s"] = time.perf_counter() - t_start
    text = table(R)
    R["table_md"] = text
    ratio = None
    jt, pt = R.get("cifar10", {}).get("train"), (R.get("cifar10", {}).get("torch") or {}).get("train")
    if jt and pt:
        ratio = jt["images_per_s"] / pt["images_per_s"]
        R["ratio_train_img_s"] = ratio
    common_dump(opts.out, R)
    print()
    print(text)
    print(f"\ntotal {R['total_s']:.0f}s; JSON: {opts.out}")
    if ratio is None:
        print("ratio ddpm_jax/pytorch train img/s: skipped (PyTorch reference not run) (cifar10 config, batch 8)")
    else:
        print(f"ratio ddpm_jax/pytorch train img/s: {ratio:.2f} (cifar10 config, batch 8)")


def common_dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)


if __name__ == "__main__":
    main()
