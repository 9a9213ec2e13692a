"""CPU benchmark set for ddpm_jax, side by side with a PyTorch (diffusers) reference.

  python bench/run.py                 # full CPU set (< 20 min on 2 cores); table + bench/out/cpu.json
  python bench/run.py --quick         # fewer steps / smaller sampling, a few minutes
  python bench/run.py --skip-torch    # JAX part only
  python bench/run.py --parts default,cifar10   # a subset of the parts below

Each part runs in its own subprocess (a clean peak RSS per part, and a forced device count for
the scaling part), one after another:

  matmul    measured f32 matmul rate (jnp.dot and torch.mm, 2048^3): the "machine peak" here
  default   the digits model (configs/ddpm.py: 8x8x1 UNet, 0.70M parameters), global batch 128, 1
            device: the pmapped train_step and the PyTorch reference, their timed steps alternating
            one for one; XLA FLOPs; sampling at batch 64 on both sides (the network call, ancestral
            at a short T, DDIM 50, each alternating), and the JAX loop's overhead over the network
  scaling2  the same train_step with XLA_FLAGS=--xla_force_host_platform_device_count=2
  cifar10   the cifar10 config (35.7M UNet) at batch 8: train_step and the PyTorch reference,
            alternating as above; XLA FLOPs
  cifar10_sampling  sampling as for the digits, at batch 4 (DDIM at batch 2)

The PyTorch reference (TorchReference) is what a PyTorch user would run for the same config:
diffusers' UNet2DModel with the same blocks and parameter count (torch_unet), DDPMScheduler noise +
MSE on eps, Adam, grad-norm clip, diffusers' EMAModel; DDPMScheduler / DDIMScheduler loops for
sampling; torch.set_num_threads(2), in the JAX side's process. Its timed calls alternate one for
one with the JAX ones, so both sides see the same background load on a shared machine.

The last lines are the ratios ddpm_jax/PyTorch, ratios of the two sides' medians (> 1: ddpm_jax
faster): `ratio ddpm_jax/pytorch train img/s: R (digits config, batch 128)`, the same for cifar10
(batch 8), then the sampling network call, ancestral sampler and DDIM-50 sampler per model.
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


def make_reference(cfg, opts, out: dict):
    """The PyTorch reference for `cfg`, or None (--skip-torch, or torch/diffusers missing: noted in out)."""
    if opts.skip_torch:
        return None
    try:
        return TorchReference(cfg)
    except ImportError as e:
        out["torch_skipped"] = repr(e)
        return None


def sampling_side_by_side(cfg, ref, out: dict, **kw) -> None:
    """common.bench_sampling, with PyTorch's network call, ancestral sampler and DDIM each timed
    right after the JAX side's repetition of the same measurement (one for one)."""
    import common

    between = None
    if ref is not None:
        n, t_steps, ddim_n = kw["n"], kw["t_steps"], kw.get("ddim_n") or kw["n"]
        ref.sampling_warmup(n)
        between = {
            "net_call": lambda: ref.net_call(n, t_steps // 2),
            "ancestral": lambda: ref.ancestral(n, t_steps),
            "ddim": lambda: ref.ddim(ddim_n, kw["ddim_steps"]),
        }
    out["sampling"] = common.bench_sampling(cfg, **kw, between=between)
    if ref is not None:
        out["torch_sampling"] = ref.sampling_results()


def check_same_size(out: dict) -> None:
    """The two UNets must be the same model: parameter counts within 5% (the layouts below match exactly)."""
    jp, tp = out["train"]["params"], out["torch"]["train"]["params"]
    assert abs(jp - tp) <= 0.05 * jp, f"PyTorch UNet has {tp} parameters, ddpm_jax's {jp}: not the same model"


def part_default(opts) -> dict:
    """The digits model (configs/ddpm.py), global batch 128, one device, side by side with PyTorch."""
    import common

    cfg = common.get_config("default", batch=128)
    out = {"env": common.env_info()}
    ref = make_reference(cfg, opts, out)
    if ref is not None:
        ref.warmup()
    out["train"] = common.bench_train(
        cfg,
        steps=opts.default_steps,
        warmup=2,
        host_batch_steps=5,
        between=None if ref is None else ref.timed_step,
    )
    if ref is not None:
        out["torch"] = ref.train_results()
        check_same_size(out)
    out["flops"] = common.model_flops(cfg, 128, compile=True)
    sampling_side_by_side(
        cfg, ref, out, n=64, t_steps=opts.default_sample_t, ddim_steps=50, reps=2, net_calls=opts.default_net_calls
    )
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
    ref = make_reference(cfg, opts, out)
    if ref is not None:
        ref.warmup()
    out["train"] = common.bench_train(
        cfg, steps=opts.cifar_steps, warmup=1, between=None if ref is None else ref.timed_step
    )
    if ref is not None:
        out["torch"] = ref.train_results()
        check_same_size(out)
    out["flops"] = common.model_flops(cfg, 8, compile=bool(opts.cifar_flops_compile))
    out["maxrss_mb"] = common.maxrss_mb()
    return out


def part_cifar10_sampling(opts) -> dict:
    import common

    cfg = common.get_config("cifar10")
    out = {"env": common.env_info()}
    ref = make_reference(cfg, opts, out)
    sampling_side_by_side(
        cfg,
        ref,
        out,
        n=opts.cifar_sample_n,
        t_steps=opts.cifar_sample_t,
        ddim_steps=50,
        ddim_n=opts.cifar_ddim_n,
        reps=1,
        net_calls=3,
    )
    return out


def torch_unet(cfg):
    """diffusers' UNet2DModel with the blocks of ddpm_jax's UNet for `cfg.model`, level for level.

    Both: a 3x3 conv_in; per level num_res_blocks ResNet blocks (GroupNorm, swish, 3x3 conv, time
    embedding projection, GroupNorm, swish, dropout, 3x3 conv; a 1x1 shortcut where the channels
    change), each followed by single-head self-attention at the attention resolutions, then a
    stride-2 3x3 conv (not after the last level); a middle of ResNet, attention, ResNet; on the way
    up num_res_blocks + 1 blocks per level on the concatenated skips, nearest upsampling + 3x3 conv;
    GroupNorm, swish, 3x3 conv_out. Time embedding: sinusoids of dim ch -> Dense(4 ch) -> swish ->
    Dense(4 ch). Digits (configs/ddpm.py): 701,345 parameters on both sides; cifar10: 35,746,307.
    """
    from diffusers import UNet2DModel

    m, size = cfg.model, cfg.data.image_size
    channels = tuple(m.ch * k for k in m.ch_mult)
    attn = [size // 2**i in m.attn_resolutions for i in range(len(channels))]
    # diffusers has one head size for every attention block: a single head needs equal widths.
    widths = {c for c, a in zip(channels, attn) if a} | {channels[-1]}  # the middle attends at the last width
    assert len(widths) == 1, f"single-head attention at widths {sorted(widths)}: diffusers needs one head size"
    return UNet2DModel(
        sample_size=size,
        in_channels=cfg.data.channels,
        out_channels=cfg.data.channels * (2 if cfg.diffusion.variance.startswith("learned") else 1),
        layers_per_block=m.num_res_blocks,
        block_out_channels=channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=widths.pop(),  # one head of all channels, as in the DDPM UNet
        norm_num_groups=m.num_groups,
        norm_eps=1e-6,
        dropout=float(m.dropout),
        downsample_padding=1,
        time_embedding_type="positional",
        add_attention=True,
    )


class TorchReference:
    """A PyTorch user's DDPM for the same config: diffusers' UNet2DModel (torch_unet), DDPMScheduler
    noise + MSE on eps, Adam, grad-norm clip and diffusers' EMAModel (the JAX step has both), on
    THREADS threads; for sampling, diffusers' DDPMScheduler (ancestral) and DDIMScheduler loops.
    Every call times itself; bench/run.py makes them between the JAX side's timed repetitions."""

    def __init__(self, cfg):
        import torch
        from diffusers import DDPMScheduler
        from diffusers import __version__ as diffusers_version

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        self.torch, self.cfg = torch, cfg
        self.versions = {
            "torch": torch.__version__,
            "diffusers": diffusers_version,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins, then sleeps)"),
        }
        self.model = torch_unet(cfg)
        self.image = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        self.T = cfg.diffusion.num_timesteps
        self.sched = DDPMScheduler(num_train_timesteps=self.T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        self.b = cfg.training.batch_size
        self.times: dict[str, list[float]] = {"train": [], "net_call": [], "ancestral": [], "ddim": []}
        self.sizes: dict[str, dict] = {}
        self.first_step_s = None
        self.opt = self.ema = self.x = None

    # ------------------------------------------------------------------ training
    def step(self) -> float:
        import torch.nn.functional as F

        torch = self.torch
        noise = torch.randn_like(self.x)
        t = torch.randint(0, self.T, (self.b,))
        noisy = self.sched.add_noise(self.x, noise, t)
        loss = F.mse_loss(self.model(noisy, t).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.ema.step(self.model.parameters())
        return loss.detach().item()

    def warmup(self):
        """Builds the optimizer and EMA (training only) and runs two untimed steps."""
        from diffusers.training_utils import EMAModel

        o = self.cfg.optim
        self.opt = self.torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.ema = EMAModel(self.model.parameters(), decay=self.cfg.training.ema_decay)
        self.x = self.torch.rand(self.b, *self.image) * 2 - 1
        self.model.train()
        t0 = time.perf_counter()
        self.step()
        self.first_step_s = time.perf_counter() - t0
        self.step()

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        fn()
        self.times[name].append(time.perf_counter() - t0)

    def timed_step(self):
        self._timed("train", self.step)

    def train_results(self) -> dict:
        import resource

        ts = self.times["train"]
        med = statistics.median(ts)
        train = {
            "params": sum(p.numel() for p in self.model.parameters()),
            "global_batch": self.b,
            "first_step_s": self.first_step_s,
            "step_times_s": ts,
            "step_median_s": med,
            "images_per_s": self.b / med,
            "images_per_s_best": self.b / min(ts),
            "threads": self.torch.get_num_threads(),
        }
        return dict(self.versions, train=train, maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)

    # ------------------------------------------------------------------ sampling (no grad, eval mode)
    def sampling_warmup(self, n: int):
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.torch.randn(n, *self.image), self.torch.full((n,), self.T // 2))

    def net_call(self, n: int, t: int):
        """The sampler's unit of work: one forward at batch n."""
        x, tt = self.torch.randn(n, *self.image), self.torch.full((n,), t)
        self.sizes["net_call"] = {"n": n}
        with self.torch.no_grad():
            self._timed("net_call", lambda: self.model(x, tt).sample)

    def ancestral(self, n: int, t_steps: int):
        """diffusers' DDPM sampling loop (as DDPMPipeline runs it) over a t_steps-step linear schedule."""
        from diffusers import DDPMScheduler

        d = self.cfg.diffusion
        sched = DDPMScheduler(
            num_train_timesteps=t_steps,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            variance_type=d.variance,
            clip_sample=self.cfg.sampling.clip_denoised,
        )
        sched.set_timesteps(t_steps)
        self.sizes["ancestral"] = {"n": n, "T": t_steps}
        self._timed("ancestral", lambda: self._loop(sched, n, {}))

    def ddim(self, n: int, num_steps: int):
        """diffusers' DDIM loop (eta = 0) over num_steps of the T-step schedule."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(
            num_train_timesteps=self.T,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            clip_sample=self.cfg.sampling.clip_denoised,
        )
        sched.set_timesteps(num_steps)
        self.sizes["ddim"] = {"n": n, "steps": num_steps}
        self._timed("ddim", lambda: self._loop(sched, n, {"eta": 0.0}))

    def _loop(self, sched, n: int, step_kw: dict):
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, *self.image, generator=g)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(self.model(x, t).sample, t, x, generator=g, **step_kw).prev_sample
        return x

    def sampling_results(self) -> dict:
        """Medians over the timed repetitions (the JAX side reports its medians the same way)."""
        out = dict(self.versions)
        for name, size in self.sizes.items():
            ts = self.times[name]
            med = statistics.median(ts)
            out[name] = dict(size, times_s=ts, median_s=med, images_per_s=size["n"] / med)
        if "net_call" in out:
            out["net_call"]["ms"] = 1e3 * out["net_call"]["median_s"]
        if "ancestral" in out:
            a = out["ancestral"]
            a["step_ms"] = 1e3 * a["median_s"] / a["T"]
            a["T1000_images_per_s"] = a["n"] / (a["median_s"] * 1000.0 / a["T"])
        return out


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
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are cold ones: no persistent cache
    if opts.torch_omp_passive:  # PyTorch's OpenMP threads sleep at barriers instead of spinning
        env["OMP_WAIT_POLICY"] = "PASSIVE"
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


MODELS = (  # (label, train part, sampling part, train batch)
    ("digits", "default", "default", 128),
    ("cifar10", "cifar10", "cifar10_sampling", 8),
)


def pair_ratios(jax_times, torch_times) -> list[float]:
    """PyTorch time / ddpm_jax time for each alternating pair (> 1: ddpm_jax faster)."""
    return [b / a for a, b in zip(jax_times, torch_times)]


def ratios(R: dict) -> list[dict]:
    """ddpm_jax / PyTorch img/s for each model: train, then the network call, ancestral and DDIM-50 sampling.
    Each is the ratio of the two sides' medians; `pairs` are the alternating pairs' own ratios."""
    out = []
    for label, tpart, spart, batch in MODELS:
        jt, pt = R.get(tpart, {}).get("train"), (R.get(tpart, {}).get("torch") or {}).get("train")
        what = f"({label} config, batch {batch})"
        r = None if not (jt and pt) else jt["images_per_s"] / pt["images_per_s"]
        pairs = pair_ratios(jt["step_times_s"], pt["step_times_s"]) if r else []
        out.append(dict(model=label, kind="train", what=what, ratio=r, pairs=pairs))
        s, ts = R.get(spart, {}).get("sampling"), R.get(spart, {}).get("torch_sampling")
        for kind, key, n_key in (
            ("sampling network", "net_call", "n"),
            ("ancestral sampler", "ancestral", "n"),
            ("DDIM-50 sampler", "ddim", "ddim_n"),
        ):
            if not s:  # the sampling part did not run: say which
                out.append(dict(model=label, kind=kind, what=f"({label} config, part {spart})", ratio=None, pairs=[]))
                continue
            what = f"({label} config, batch {s[n_key]}" + (f", T={s['T']} run)" if key == "ancestral" else ")")
            r, pairs = None, []
            if ts and key in ts:
                r = ts[key]["median_s"] / s[f"{key}_median_s"]  # same batch on both sides
                pairs = pair_ratios(s[f"{key}_times_s"], ts[key]["times_s"])
            out.append(dict(model=label, kind=kind, what=what, ratio=r, pairs=pairs))
    return out


def ratio_line(r: dict) -> str:
    val = "skipped (PyTorch reference not run)" if r["ratio"] is None else f"{r['ratio']:.2f}"
    return f"ratio ddpm_jax/pytorch {r['kind']} img/s: {val} {r['what']}"


def table(R: dict) -> str:
    L = []
    mm = R.get("matmul", {})
    jax_peak = mm.get("jax_f32", {}).get("gflops")
    torch_peak = mm.get("torch_f32", {}).get("gflops")
    env = mm.get("env") or R.get("default", {}).get("env") or {}
    ref = R.get("default", {}).get("torch") or R.get("cifar10", {}).get("torch") or {}
    L.append(
        f"Machine: {env.get('cpu_count')} CPUs, jax {env.get('jax')} ({env.get('backend')}), flax "
        f"{env.get('flax')}; torch {ref.get('torch', '-')}, diffusers "
        f"{ref.get('diffusers', '-')} (OMP_WAIT_POLICY {ref.get('omp_wait_policy', '-')}). Measured f32 matmul 2048^3: jnp.dot "
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
            f"| {label} | {impl} | {tr.get('devices', 1)} | {tr['global_batch']} | {tr['params'] / 1e6:.3f}M | "
            f"{fmt(compile_s, '.1f')}{' (1st step)' if torch_row else ''} | {tr['step_median_s']:.3f} | "
            f"{tr['images_per_s']:.1f} | {fmt(None if fl is None else fl / 1e9, '.3f')} | {fmt(ach, '.1f')} | "
            f"{fmt(None if ach is None or not peak else 100 * ach / peak, '.0f')} | {fmt(mem, '.0f')} | "
            f"{'(same process)' if torch_row else fmt(p.get('maxrss_mb') or tr.get('maxrss_mb'), '.0f')} |"
        )

    row("default (digits 8x8)", "ddpm_jax", "default")
    row("default (digits 8x8)", "PyTorch diffusers", "default", torch_row=True)
    row("default (digits 8x8)", "ddpm_jax", "scaling2", flops_from="default")
    row("cifar10 (32x32x3)", "ddpm_jax", "cifar10")
    row("cifar10 (32x32x3)", "PyTorch diffusers", "cifar10", torch_row=True)
    L.append("")
    for r in ratios(R):
        if r["pairs"]:
            L.append(
                f"{r['model']} {r['kind']} {r['what']}: the two sides' timed repetitions alternate one for one; "
                f"per-pair ratios (PyTorch s / ddpm_jax s) {', '.join(f'{x:.2f}' for x in r['pairs'])} "
                f"(median {statistics.median(r['pairs']):.2f})."
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
        "| sampling | impl | N | network call at N: ms (median), img/s | T run | ancestral ms/step | "
        "ancestral img/s at T=1000 (extrapolated) | DDIM-50: N, s, img/s | network in a scan ms/step | "
        "loop overhead % | sampler's own ms/step (% of network), isolated |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, part in (("default (digits)", "default"), ("cifar10", "cifar10_sampling")):
        s, ts = R.get(part, {}).get("sampling"), R.get(part, {}).get("torch_sampling") or {}
        if not s:
            L.append(f"| {label} | ddpm_jax |{' |' * 8} {'not run' if part not in R else 'failed'} |")
            continue
        L.append(
            f"| {label} | ddpm_jax | {s['n']} | {s['net_call_ms']:.1f}, {s['net_call_images_per_s']:.0f} | "
            f"{s['T']} | {s['ancestral_step_ms']:.1f} | {s['ancestral_T1000_images_per_s']:.3g} | "
            f"{s.get('ddim_n', '-')}, {fmt(s.get('ddim_median_s'), '.2f')}, {fmt(s.get('ddim_images_per_s'), '.3g')} | "
            f"{s['net_eval_ms']:.1f} | {s['overhead_pct']:+.1f} | "
            f"{s['sampler_own_ms']:.2f} ({s['sampler_own_pct']:+.1f}%) |"
        )
        if ts:
            nc, an, dd = ts.get("net_call", {}), ts.get("ancestral", {}), ts.get("ddim", {})
            L.append(
                f"| {label} | PyTorch diffusers | {nc.get('n', '-')} | {fmt(nc.get('ms'), '.1f')}, "
                f"{fmt(nc.get('images_per_s'), '.0f')} | {an.get('T', '-')} | {fmt(an.get('step_ms'), '.1f')} | "
                f"{fmt(an.get('T1000_images_per_s'), '.3g')} | {dd.get('n', '-')}, {fmt(dd.get('median_s'), '.2f')}, "
                f"{fmt(dd.get('images_per_s'), '.3g')} | - | - | - |"
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
    ap.add_argument(
        "--torch-omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for PyTorch (on a loaded machine its spinning OpenMP barriers cost 10x+)",
    )
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--out", default=os.path.join(HERE, "out", "cpu.json"))
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--default-steps", type=int, default=None)
    ap.add_argument("--default-sample-t", type=int, default=None)
    ap.add_argument("--default-net-calls", type=int, default=None)
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
        default_net_calls=(5, 10),
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

    names = opts.parts.split(",")
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(PARTS)}")
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
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if have_torch and not opts.skip_torch and not opts.torch_omp_passive and load > cpus:
        print(
            f"WARNING: load average {load:.1f} on {cpus} CPUs: PyTorch's spinning OpenMP barriers stall when its "
            "threads are descheduled (10x+ slower steps); add --torch-omp-passive for a fair ratio here",
            flush=True,
        )
    if not have_torch and "--skip-torch" not in opts.passthrough:
        opts.passthrough.append("--skip-torch")
    for name in names:
        R[name] = run_part(name, opts, outdir)
        R["total_s"] = time.perf_counter() - t_start
        common_dump(opts.out, R)
    R["total_s"] = time.perf_counter() - t_start
    text = table(R)
    R["table_md"] = text
    R["ratios"] = ratios(R)
    common_dump(opts.out, R)
    print()
    print(text)
    print(f"\ntotal {R['total_s']:.0f}s; JSON: {opts.out}")
    for r in sorted(R["ratios"], key=lambda r: r["kind"] != "train"):  # the train lines first
        print(ratio_line(r))


def common_dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)


if __name__ == "__main__":
    main()
