"""Shared measurement helpers for bench/run.py (CPU) and bench/gpu_bench.py (GPU).

Only ddpm_jax.training.train_lib, ddpm_jax.methods, ddpm_jax.core.sampling, ddpm_jax.core.schedules and the configs are imported:
never ddpm_jax.data.pipeline (tensorflow), so this runs on a machine with JAX/Flax/Optax/chex and the
ml_collections wheel alone. Every batch is synthetic (uniform in [-1, 1]).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import platform
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def get_config(name: str, batch: int | None = None, dtype: str | None = None):
    from ddpm_jax import configuration  # the shipped configs by name, installed or from this checkout

    cfg = configuration.load_config_file({"default": "ddpm", "cifar10": "cifar10"}[name])
    if batch is not None:
        cfg.training.batch_size = batch
    if dtype is not None:
        cfg.model.dtype = dtype
    return cfg


def now() -> float:
    return time.perf_counter()


def maxrss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cost(compiled_or_lowered) -> dict:
    ca = compiled_or_lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax returned one dict per device program
        ca = ca[0] if ca else {}
    return dict(ca or {})


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend implements it
        return {"error": repr(e)}
    if m is None:
        return {}
    out = {
        k: int(getattr(m, k))
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
        )
        if hasattr(m, k)
    }
    out["peak_estimate_mb"] = (
        out.get("argument_size_in_bytes", 0)
        + out.get("output_size_in_bytes", 0)
        - out.get("alias_size_in_bytes", 0)
        + out.get("temp_size_in_bytes", 0)
    ) / 2**20
    return out


def device_peak_mb() -> float | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
        return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None
    except Exception:  # noqa: BLE001
        return None


def env_info() -> dict:
    d = jax.local_devices()[0]
    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "num_devices": jax.local_device_count(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    for mod in ("flax", "optax", "chex", "jaxlib"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def timed_calls(fn, n: int, *, carry=None, between=None):
    """Runs fn n times (carry threads the first output back in), blocking each; returns seconds.

    between(), if given, runs untimed after each call (bench/run.py times a PyTorch step there, so
    that both sides alternate under the same background load)."""
    times = []
    for _ in range(n):
        t0 = now()
        out = fn(carry) if carry is not None else fn()
        jax.block_until_ready(out)
        times.append(now() - t0)
        if carry is not None:
            carry = out
        if between is not None:
            between()
    return times, carry


def bench_train(
    cfg,
    *,
    steps: int,
    warmup: int = 2,
    seed: int = 0,
    host_batch_steps: int = 0,
    between=None,
    pipelined: bool = False,
    trace_dir: str | None = None,
    trace_steps: int = 3,
) -> dict:
    """The pmapped train_step (train_lib.compile_steps(...).p_train) on a synthetic global batch.

    Compiles ahead of time (lower + compile, timed), then runs `warmup` untimed and `steps` timed
    steps, each blocked on. Returns throughput, compile time, XLA memory analysis and cost analysis.
    pipelined: also time `steps` steps dispatched back to back with one block at the end, as
    ddpm_jax.training.loop runs them (the host enqueues step k+1 while the device runs step k).
    trace_dir: profile `trace_steps` pipelined steps there (jax.profiler, with a Perfetto trace), and
      write the compiled step's HLO text beside it.
    """
    from ddpm_jax import methods
    from ddpm_jax.training import distributed, train_lib

    ndev = jax.local_device_count()
    gb = cfg.training.batch_size
    assert gb % ndev == 0, (gb, ndev)
    size, ch = cfg.data.image_size, cfg.data.channels
    t0 = now()
    method = methods.from_config(cfg)
    steps_fns = train_lib.compile_steps(method, cfg)
    state = train_lib.create_train_state(method, steps_fns.tx, jax.random.PRNGKey(seed), flat=cfg.optim.flatten)
    p_train = steps_fns.p_train
    rstate = distributed.replicate(state)
    # The batch is laid out like a loader's: one shard per device along axis 0.
    host = np.random.default_rng(seed).uniform(-1, 1, (ndev, gb // ndev, size, size, ch)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (train_lib.AXIS,))
    batch = jax.device_put(host, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train_lib.AXIS)))
    init_s = now() - t0

    t0 = now()
    lowered = p_train.lower(rstate, batch)
    t1 = now()
    compiled = lowered.compile()
    t2 = now()
    cost = _cost(compiled)
    mem = _memory(compiled)

    def step(s):
        return compiled(s, batch)[0]

    _, rstate = timed_calls(step, warmup, carry=rstate)
    times, rstate = timed_calls(step, steps, carry=rstate, between=between)
    extra = {}
    if pipelined:
        start = now()
        for _ in range(steps):
            rstate = step(rstate)
        dispatched = now()
        jax.block_until_ready(rstate)
        extra["pipelined_step_s"] = (now() - start) / steps
        extra["pipelined_dispatch_s_per_step"] = (dispatched - start) / steps  # host time to enqueue a step
        extra["pipelined_steps_per_s"] = 1.0 / extra["pipelined_step_s"]
        extra["pipelined_images_per_s"] = gb / extra["pipelined_step_s"]
    if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(trace_steps):
                rstate = step(rstate)
            jax.block_until_ready(rstate)
        found = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
        extra["trace"] = max(found, key=os.path.getmtime) if found else None
        extra["hlo"] = os.path.join(trace_dir, "train_step.hlo.txt")  # names the trace's ops (cpu_op_profile.py)
        with open(extra["hlo"], "w") as f:
            f.write(compiled.as_text())
        extra["trace_steps"] = trace_steps
    host_times = []
    if host_batch_steps:  # as ddpm_jax.training.loop feeds it: a fresh host (numpy) batch every step
        # Explicit device_put with the step's input sharding: calling the pmapped function on a
        # numpy array instead re-compiles the step once (another full compile after this AOT one).
        sharding = batch.sharding
        hosts = [host + np.float32(1e-3 * i) for i in range(host_batch_steps + 1)]
        for hb in hosts:  # the first is untimed below
            th = now()
            rstate = compiled(rstate, jax.device_put(hb, sharding))[0]
            jax.block_until_ready(rstate)
            host_times.append(now() - th)
        host_first_s, host_times = host_times[0], host_times[1:]
    _, metrics = compiled(rstate, batch)
    loss = float(np.asarray(metrics["loss"])[0])
    med = statistics.median(times)
    flops_step = cost.get("flops")  # XLA counts the per-device program
    return {
        "config": cfg.data.dataset,
        "model_dtype": cfg.model.dtype,
        "global_batch": gb,
        "devices": ndev,
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
        "init_s": init_s,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "step_times_s": times,
        "step_median_s": med,
        "step_min_s": min(times),
        "steps_per_s": 1.0 / med,
        "images_per_s": gb / med,
        "images_per_s_best": gb / min(times),
        "train_step_flops_per_device": flops_step,
        "train_step_flops_per_image": None if flops_step is None else flops_step * ndev / gb,
        "train_step_bytes_accessed": cost.get("bytes accessed"),
        "xla_memory": mem,
        "device_peak_mb": device_peak_mb(),
        "maxrss_mb": maxrss_mb(),
        "final_loss": loss,
        "host_batch_step_times_s": host_times,
        "host_batch_first_s": host_first_s if host_batch_steps else None,
        "host_batch_images_per_s": gb / statistics.median(host_times) if host_times else None,
        **extra,
    }


def network(cfg):
    """The config's network (for a DDPM with the fixed decoder: the UNet), as the method builds it."""
    from ddpm_jax import methods

    return methods.from_config(cfg).model


def model_flops(cfg, batch: int, *, compile: bool = True) -> dict:
    """FLOPs per image of the UNet forward and forward+backward (grad w.r.t. params), from XLA.

    fwd+bwd is `jax.jit(jax.value_and_grad(loss)).lower(...).compile().cost_analysis()`; with
    compile=False the (pre-optimisation) lowered module's analysis is used (within ~1% here).
    """
    model = network(cfg)
    size, ch = cfg.data.image_size, cfg.data.channels
    x = jnp.zeros((batch, size, size, ch))
    t = jnp.zeros((batch,), jnp.int32)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x, t)["params"]

    def loss(p, x, t):
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jnp.square(out - x))

    res = {"batch": batch}
    t0 = now()
    low = jax.jit(jax.value_and_grad(loss)).lower(params, x, t)
    obj = low.compile() if compile else low
    fl = _cost(obj).get("flops")  # XLA:GPU's lowered module has no "flops" entry (seen on jax 0.11.2)
    res["fwd_bwd_flops_per_image"] = None if fl is None else fl / batch
    res["fwd_bwd_source"] = "compiled" if compile else "lowered"
    res["fwd_bwd_analysis_s"] = now() - t0
    low_f = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False)).lower(params, x, t)
    fl = _cost(low_f).get("flops")  # lowered: no extra compile
    res["fwd_flops_per_image"] = None if fl is None else fl / batch
    return res


def matmul_gflops(n: int = 2048, reps: int = 10, dtype=jnp.float32) -> dict:
    """Measured jnp.dot rate on [n, n] x [n, n] (median of reps)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    times, _ = timed_calls(lambda: f(a, b), reps)
    return {
        "n": n,
        "dtype": str(jnp.dtype(dtype)),
        "median_s": statistics.median(times),
        "gflops": 2 * n**3 / statistics.median(times) / 1e9,
        "gflops_best": 2 * n**3 / min(times) / 1e9,
    }


_PARAMS: dict = {}


def random_params(model, size: int, ch: int, seed: int = 0):
    """Random UNet params drawn on the host (no compile: a jitted init took ~30 s to compile on the
    H200, the eager one minutes on CPU). Kernels ~ N(0, 1/fan_in), GroupNorm scales 1 + noise, biases
    small noise, so every layer (the zero-initialised ones too) carries non-zero activations."""
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, ch)),
        jnp.zeros((1,), jnp.int32),
    )["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        x = rng.standard_normal(s.shape).astype(np.float32)
        if name == "kernel":
            x /= np.sqrt(np.prod(s.shape[:-1]))
        elif name == "scale":
            x = 1.0 + 0.02 * x
        else:
            x *= 0.02
        return jnp.asarray(x, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def bench_sampling(
    cfg,
    *,
    n: int,
    t_steps: int,
    ddim_steps: int | None = 50,
    reps: int = 1,
    ddim_n: int | None = None,
    net_calls: int = 5,
    between: dict | None = None,
) -> dict:
    """The sampling network call alone, the ancestral sample_loop (T = t_steps) vs the same T network
    evaluations in a bare scan, and DDIM.

    net_call: one jitted forward at batch n (the sampler's unit of work), timed net_calls times.
    The schedule is rebuilt with t_steps timesteps (a cheaper stand-in for T = 1000: the per-step
    work is the same). "Network alone" is one lax.scan of T UNet evaluations at batch n with a
    trivial carry update, so the sampler's extra cost (posterior mean/variance, clipping, noise)
    is the difference.
    between: {"net_call" | "ancestral" | "ddim": fn}; fn runs untimed after each timed repetition of
    that measurement (bench/run.py times PyTorch's counterpart there: both alternate under one load).
    """
    from ddpm_jax.core import sampling, schedules

    between = between or {}
    model = network(cfg)
    size, ch = cfg.data.image_size, cfg.data.channels
    shape = (n, size, size, ch)
    key = (
        cfg.model.ch,
        tuple(cfg.model.ch_mult),
        cfg.model.num_res_blocks,
        tuple(cfg.model.attn_resolutions),
        cfg.model.num_groups,
        size,
        ch,
    )  # params are float32 whatever the compute dtype: init once
    if key not in _PARAMS:
        _PARAMS[key] = random_params(model, size, ch)
    params = _PARAMS[key]
    sched = schedules.make_schedule(cfg.diffusion.schedule, t_steps)
    dcfg = cfg.diffusion

    def apply(p, x, t):
        return model.apply({"params": p}, x, t, train=False)

    def model_fn_of(p):
        return functools.partial(apply, p)

    def ancestral(p, rng):
        return sampling.sample_loop(
            sched,
            model_fn_of(p),
            shape,
            rng,
            parameterization=dcfg.parameterization,
            variance=dcfg.variance,
            clip_denoised=cfg.sampling.clip_denoised,
        )["samples"]

    def net_alone(p, x, steps):
        def body(x, tt):
            out = apply(p, x, jnp.full((x.shape[0],), tt, jnp.int32))
            return (0.9 * x + 0.1 * out[..., :ch]).astype(x.dtype), None

        return jax.lax.scan(body, x, jnp.arange(steps - 1, -1, -1, dtype=jnp.int32))[0]

    res = {"n": n, "T": t_steps}
    rng = jax.random.PRNGKey(3)
    x0 = jax.random.normal(rng, shape)

    def run(name, f, *args, n_reps=reps):
        t0 = now()
        c = jax.jit(f).lower(*args).compile()
        res[f"{name}_compile_s"] = now() - t0
        times, _ = timed_calls(lambda: c(*args), n_reps, between=between.get(name))
        res[f"{name}_s"] = min(times)
        res[f"{name}_median_s"] = statistics.median(times)
        res[f"{name}_times_s"] = times

    run("net_call", apply, params, x0, jnp.full((n,), t_steps // 2, jnp.int32), n_reps=net_calls)
    res["net_call_ms"] = 1e3 * res["net_call_median_s"]
    res["net_call_images_per_s"] = n / res["net_call_median_s"]
    run("ancestral", ancestral, params, rng)
    run("net_alone", functools.partial(net_alone, steps=t_steps), params, x0)
    res["overhead_pct"] = 100.0 * (res["ancestral_s"] / res["net_alone_s"] - 1.0)

    # The sampler's own per-step work, isolated: the same loop around a near-free network, minus a
    # bare scan around it. The difference of the two full runs above carries the machine's drift
    # between them (on a 2-core CPU, several % of a step); this does not.
    out_ch = jax.eval_shape(apply, params, x0, jnp.zeros((n,), jnp.int32)).shape[-1]

    def trivial_net(x, t):
        return jnp.concatenate([0.5 * x] * (out_ch // ch), axis=-1)

    def sampler_trivial(rng):
        return sampling.sample_loop(
            sched,
            trivial_net,
            shape,
            rng,
            parameterization=dcfg.parameterization,
            variance=dcfg.variance,
            clip_denoised=cfg.sampling.clip_denoised,
        )["samples"]

    def scan_trivial(x):
        def body(x, tt):
            return 0.9 * x + 0.1 * trivial_net(x, tt)[..., :ch], None

        return jax.lax.scan(body, x, jnp.arange(t_steps - 1, -1, -1, dtype=jnp.int32))[0]

    run("sampler_trivial", sampler_trivial, rng, n_reps=max(reps, 5))
    run("scan_trivial", scan_trivial, x0, n_reps=max(reps, 5))
    res["sampler_own_ms"] = 1e3 * (res["sampler_trivial_s"] - res["scan_trivial_s"]) / t_steps
    res["sampler_own_pct"] = 100.0 * res["sampler_own_ms"] / (1e3 * res["net_alone_s"] / t_steps)
    res["ancestral_images_per_s"] = n / res["ancestral_median_s"]
    res["net_eval_ms"] = 1e3 * res["net_alone_s"] / t_steps
    res["ancestral_step_ms"] = 1e3 * res["ancestral_median_s"] / t_steps
    res["ancestral_T1000_s_extrapolated"] = res["ancestral_median_s"] * 1000.0 / t_steps
    res["ancestral_T1000_images_per_s"] = n / res["ancestral_T1000_s_extrapolated"]
    if ddim_steps:
        dn = ddim_n or n
        dshape = (dn, size, size, ch)
        full = schedules.make_schedule(dcfg.schedule, dcfg.num_timesteps)

        def ddim(p, rng):
            return sampling.ddim_sample_loop(
                full,
                model_fn_of(p),
                dshape,
                rng,
                num_steps=ddim_steps,
                eta=0.0,
                parameterization=dcfg.parameterization,
                clip_denoised=cfg.sampling.clip_denoised,
            )["samples"]

        run("ddim", ddim, params, rng)
        res["ddim_n"], res["ddim_steps"] = dn, ddim_steps
        res["ddim_images_per_s"] = dn / res["ddim_median_s"]
        res["ddim_step_ms"] = 1e3 * res["ddim_median_s"] / ddim_steps
    res["maxrss_mb"] = maxrss_mb()
    res["device_peak_mb"] = device_peak_mb()
    return res


def copy_bandwidth(n_bytes: int = 1 << 30, reps: int = 10) -> dict:
    """Device memory bandwidth from an elementwise x + 1 over n_bytes of f32 (bytes read + written)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    jax.block_until_ready(f(x))
    times, _ = timed_calls(lambda: f(x), reps)
    return {
        "bytes": 2 * n_bytes,
        "median_s": statistics.median(times),
        "gb_per_s": 2 * n_bytes / statistics.median(times) / 1e9,
    }


def dump(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
