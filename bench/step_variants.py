"""The measurements behind issue 24's step changes on XLA:CPU: each prints a table and writes JSON.

    JAX_PLATFORMS=cpu python bench/step_variants.py [--parts flags,groupnorm,groupnorm_step,attention,devices]

- flags: the train step (configs vdm at batch 128 and cifar10 at batch 8) compiled under each YNNPACK
  setting (XLA compiler options for that one compile), their steps alternating one for one in one
  process per config: today's default (YNNPACK for dots only), YNNPACK also for elementwise ops and
  reductions (XLA's default but for convolutions, ddpm_jax's previous default), no YNNPACK at all
  (cifar10: the first two only; each compile takes minutes).
- groupnorm: one GroupNorm + swish (+ a residual add before it), forward and backward, flax's
  nn.GroupNorm then swish (what layers.group_norm is) against a hand-folded affine form
  (`_affine_group_norm_swish`, tried in issue 24), at the digits and cifar10 UNets' shapes.
- groupnorm_step: the whole train step (both configs) with each of the two, compiled in one process
  and alternating step for step.
- attention: the attention core, forward and backward: two einsums (`layers.AttnBlock`) against
  `jax.nn.dot_product_attention`, at the digits' 4x4 and 2x2 and cifar10's 16x16 and 4x4 sizes.
- devices: the digits step on one device (jit, batch 128) against two forced host devices (pmap,
  64 each), alternating step for step in one process.

Times are medians; `--steps` and `--reps` set how many. JSON: bench/results/step_variants.json (--out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from ddpm_jax import xla_flags  # noqa: E402  (jax is not imported yet)

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_KINDS = lambda *k: ",".join(f"LIBRARY_FUSION_TYPE_{x}" for x in k)  # noqa: E731
# Per-compile settings of XLA's YNNPACK fusion types (compiler_options override XLA_FLAGS for one compile),
# so that the settings' steps can alternate in one process.
YNN_SETTINGS = {
    "dots only (default)": {_YNN: _KINDS("DOT", "INDIVIDUAL_DOT")},
    "dots, elementwise, reductions": {_YNN: _KINDS("DOT", "ELTWISE", "REDUCE", "INDIVIDUAL_DOT")},
    "none": {_YNN: ""},
}
STEP_CONFIGS = {"vdm": 128, "cifar10": 8}


def _median_s(fn, reps: int) -> float:
    """The median seconds of `reps` blocked calls of fn after one warm-up call (common.timed_calls)."""
    import common
    import jax

    jax.block_until_ready(fn())
    return statistics.median(common.timed_calls(fn, reps)[0])


def _train_step(name: str, batch_size: int):
    """(compiled step, state, batch) of a config's train step on one device."""
    import jax
    import numpy as np

    from ddpm_jax import configuration, methods
    from ddpm_jax.training import train_lib

    config = configuration.load_config_file(name)
    config.training.batch_size = batch_size
    method = methods.from_config(config)
    state = train_lib.create_train_state(method, train_lib.make_optimizer(config), jax.random.PRNGKey(0))
    size, ch = config.data.image_size, config.data.channels
    batch = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, ch)).astype(np.float32)
    step = functools.partial(train_lib.train_step, method=method, config=config)
    return step, state, batch


def _alternate(compiled: dict, state, batch, steps: int) -> dict[str, list[float]]:
    """Each compiled train step from the same state, 3 warm-up steps each, then `steps` rounds in which
    every form takes one step in turn (fed back its own state); the seconds of each form's steps."""
    import jax

    states = dict.fromkeys(compiled, state)
    for form, fn in compiled.items():
        for _ in range(3):
            states[form], _ = fn(states[form], batch)
        jax.block_until_ready(states[form])
    times = {form: [] for form in compiled}
    for _ in range(steps):
        for form, fn in compiled.items():
            t0 = time.perf_counter()
            states[form], metrics = fn(states[form], batch)
            jax.block_until_ready((states[form], metrics))
            times[form].append(time.perf_counter() - t0)
    return times


def settings_timing(name: str, settings: list[str], steps: int) -> dict:
    """The train step of one config compiled under each YNNPACK setting, their steps alternating one for
    one in this process (the flags part's child): per setting the median and the pair ratios against the
    first setting (its step time / this one's: > 1 means this one is faster)."""
    import jax

    step, state, batch = _train_step(name, STEP_CONFIGS[name])
    lowered = jax.jit(functools.partial(step, axis_name=None)).lower(state, batch)
    compiled, compile_s = {}, {}
    for setting in settings:
        t0 = time.perf_counter()
        compiled[setting] = lowered.compile(compiler_options=YNN_SETTINGS[setting])
        compile_s[setting] = time.perf_counter() - t0
    times = _alternate(compiled, state, batch, steps)
    base = times[settings[0]]
    rows = []
    for setting in settings:
        ratios = [a / b for a, b in zip(base, times[setting], strict=True)]
        rows.append(
            {
                "config": name,
                "batch": STEP_CONFIGS[name],
                "ynn": setting,
                "compile_s": compile_s[setting],
                "step_ms": 1e3 * statistics.median(times[setting]),
                "pair_ratio_vs_first": statistics.median(ratios),
                "pairs": steps,
            }
        )
    return {"rows": rows, "load": os.getloadavg()[0]}


def flags_part(configs: list[str], steps: int) -> dict:
    rows = []
    for name in configs:
        settings = list(YNN_SETTINGS) if name != "cifar10" else list(YNN_SETTINGS)[:2]  # cifar10 compiles take minutes
        n = max(6, steps // 3) if name == "cifar10" else steps
        env = dict(os.environ, DDPM_JAX_COMPILATION_CACHE="0")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = [sys.executable, __file__, "--child-step", name, "--steps", str(n), "--settings", "|".join(settings)]
        out = json.loads(
            subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        for row in out["rows"]:
            rows.append({**row, "load": out["load"]})
            print(
                f"  {name:8} {row['ynn']:30} {row['step_ms']:8.1f} ms  pair ratio {settings[0]} / this "
                f"{row['pair_ratio_vs_first']:.3f}  (compile {row['compile_s']:.0f} s, {n} pairs, load {out['load']:.1f})"
            )
    return {"rows": rows}


def groupnorm_part(reps: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax.models import layers

    rows = []
    for shape, groups in [((128, 8, 8, 32), 8), ((128, 4, 4, 64), 8), ((8, 32, 32, 128), 32), ((8, 16, 16, 256), 32)]:
        rng = np.random.default_rng(0)
        x, r = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
        p = {k: jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for k in ("scale", "bias")}
        norm = nn.GroupNorm(num_groups=groups, epsilon=layers.GROUPNORM_EPS)
        forms = {
            "flax GroupNorm + swish": lambda p, x, r, norm=norm: nn.swish(norm.apply({"params": p}, x + r)),
            "affine GroupNorm + swish": lambda p, x, r, g=groups: _affine_group_norm_swish(
                x + r, p["scale"], p["bias"], g, True, layers.GROUPNORM_EPS
            ),
        }
        row = {"shape": shape, "groups": groups}
        for form, f in forms.items():
            grad = jax.jit(jax.grad(lambda p, x, r, f=f: jnp.sum(f(p, x, r) * r), argnums=(0, 1, 2)))
            row[form] = 1e6 * _median_s(functools.partial(grad, p, x, r), reps)
        row["speedup"] = row["flax GroupNorm + swish"] / row["affine GroupNorm + swish"]
        rows.append(row)
        print(
            f"  {str(shape):18} groups {groups:2}: flax {row['flax GroupNorm + swish']:8.0f} us, affine {row['affine GroupNorm + swish']:8.0f} us, {row['speedup']:.2f}x"
        )
    return {"rows": rows, "what": "forward + backward of residual add -> GroupNorm -> swish, microseconds"}


def attention_part(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    def einsums(q, k, v):  # layers.AttnBlock's core
        logits = jnp.einsum("bqc,bkc->bqk", q * (q.shape[-1] ** -0.5), k)
        return jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)

    def library(q, k, v):
        return jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]

    rows = []
    for b, hw, c in [(128, 16, 64), (128, 4, 64), (8, 256, 256), (8, 16, 256)]:
        rng = np.random.default_rng(0)
        qkv = [jnp.asarray(rng.standard_normal((b, hw, c)), jnp.float32) for _ in range(3)]
        row = {"batch": b, "tokens": hw, "channels": c}
        for form, f in {"einsums": einsums, "dot_product_attention": library}.items():
            grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
            row[form] = 1e6 * _median_s(functools.partial(grad, *qkv), reps)
        rows.append(row)
        print(
            f"  B {b:3} tokens {hw:3} C {c:3}: einsums {row['einsums']:8.0f} us, dot_product_attention {row['dot_product_attention']:8.0f} us"
        )
    return {"rows": rows, "what": "forward + backward of the attention core, microseconds"}


def _affine_group_norm_swish(x, scale, bias, num_groups: int, swish: bool, eps: float):
    """The hand-folded GroupNorm tried in issue 24: the group mean and E[x^2] (float32), then y = x * a + b
    with a = scale / sqrt(var + eps) and b = bias - mean * a per (example, channel), and swish, in one pass."""
    import jax
    import jax.numpy as jnp

    b, c = x.shape[0], x.shape[-1]
    groups = x.astype(jnp.float32).reshape(b, -1, num_groups, c // num_groups)  # [B, HW, G, C/G]
    mean = jnp.mean(groups, axis=(1, 3), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(groups), axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
    a = scale.reshape(1, 1, num_groups, -1) * jax.lax.rsqrt(var + eps)
    y = (groups * a + (bias.reshape(1, 1, num_groups, -1) - mean * a)).reshape(x.shape)
    return y * jax.nn.sigmoid(y) if swish else y


def _affine_group_norm(num_groups, dtype, name=None):
    """A stand-in for layers.group_norm with flax's parameters ('scale', 'bias') computing the affine form;
    swish, applied by the caller after it, then recomputes nothing (XLA fuses it into the same pass)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from ddpm_jax.models import layers

    class AffineGroupNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            c = x.shape[-1]
            scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
            y = _affine_group_norm_swish(x, scale, bias, num_groups, False, layers.GROUPNORM_EPS)
            return y.astype(dtype)

    return AffineGroupNorm(name=name)


def groupnorm_step_child(name: str, steps: int) -> dict:
    """The train step with flax's GroupNorm + swish (kept) and with the affine form (tried), compiled in one
    process (the module is swapped while tracing), their steps alternating one for one."""
    import jax

    from ddpm_jax.models import layers, unet

    step, state, batch = _train_step(name, STEP_CONFIGS[name])
    compiled, saved = {}, layers.group_norm
    for form in ("flax GroupNorm + swish", "affine GroupNorm + swish"):
        if form.startswith("affine"):  # the blocks' norms and the UNet's last one
            layers.group_norm = unet.group_norm = _affine_group_norm
        try:
            compiled[form] = jax.jit(functools.partial(step, axis_name=None)).lower(state, batch).compile()
        finally:
            layers.group_norm = unet.group_norm = saved
    times = _alternate(compiled, state, batch, steps)
    flax_t, affine_t = times.values()
    return {
        "config": name,
        "batch": STEP_CONFIGS[name],
        "pairs": steps,
        "step_ms": {form: 1e3 * statistics.median(t) for form, t in times.items()},
        "pair_ratio_flax_over_affine": statistics.median([a / b for a, b in zip(flax_t, affine_t, strict=True)]),
        "load": os.getloadavg()[0],
    }


def groupnorm_step_part(configs: list[str], steps: int) -> dict:
    rows = []
    for name in configs:
        n = max(6, steps // 3) if name == "cifar10" else steps
        row = _child(["--child-groupnorm-step", name, "--steps", str(n)], os.environ.get("XLA_FLAGS", ""))
        rows.append(row)
        flax_ms, affine_ms = row["step_ms"].values()
        print(
            f"  {name:8} flax GroupNorm + swish {flax_ms:8.1f} ms, affine form {affine_ms:8.1f} ms, pair ratio "
            f"flax / affine {row['pair_ratio_flax_over_affine']:.3f} (> 1: the affine form is faster; {n} pairs, "
            f"load {row['load']:.1f})"
        )
    return {"rows": rows}


def _child(args: list[str], xla_flags_value: str) -> dict:
    """Runs this script with `args` in a fresh process (its own XLA flags, no compilation cache); its last
    stdout line is JSON."""
    env = dict(os.environ, XLA_FLAGS=xla_flags_value, DDPM_JAX_COMPILATION_CACHE="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def devices_child(steps: int) -> dict:
    import jax

    from ddpm_jax.training import distributed

    step, state, batch = _train_step("vdm", 128)
    devices = jax.local_device_count()
    one = jax.jit(functools.partial(step, axis_name=None))
    many = jax.pmap(step, axis_name=distributed.AXIS)
    s1, b1 = state, jax.device_put(batch)
    sd = distributed.replicate(state)
    bd = jax.device_put(batch.reshape((devices, -1) + batch.shape[1:]), distributed.replicate(batch[:1]).sharding)
    for _ in range(3):
        s1, _ = one(s1, b1)
        sd, _ = many(sd, bd)
    jax.block_until_ready((s1, sd))
    t1, td = [], []
    for _ in range(steps):
        for fn, times in ((lambda: one(s1, b1), t1), (lambda: many(sd, bd), td)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(t1, td, strict=True)]
    return {
        "devices": devices,
        "one_device_ms": 1e3 * statistics.median(t1),
        "forced_devices_ms": 1e3 * statistics.median(td),
        "pair_ratio_one_over_forced": statistics.median(ratios),
        "load": os.getloadavg()[0],
    }


def devices_part(steps: int) -> dict:
    flags = f"{xla_flags.YNN_DOTS_ONLY} --xla_force_host_platform_device_count=2"
    row = _child(["--child-devices", "--steps", str(steps)], flags)
    print(
        f"  vdm batch 128: 1 device {row['one_device_ms']:.1f} ms, 2 forced devices {row['forced_devices_ms']:.1f} ms, "
        f"pair median 1 / 2 = {row['pair_ratio_one_over_forced']:.3f}"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="flags,groupnorm,groupnorm_step,attention,devices")
    ap.add_argument("--configs", default="vdm,cifar10", help="the flags part's train steps")
    ap.add_argument("--steps", type=int, default=25, help="timed train steps (cifar10: a quarter)")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions of the microbenchmarks")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "step_variants.json"))
    ap.add_argument("--child-step", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--child-devices", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-groupnorm-step", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child_step or opts.child_devices or opts.child_groupnorm_step:  # XLA_FLAGS come from the parent
        if opts.child_step:
            row = settings_timing(opts.child_step, opts.settings.split("|"), opts.steps)
        elif opts.child_groupnorm_step:
            row = groupnorm_step_child(opts.child_groupnorm_step, opts.steps)
        else:
            row = devices_child(opts.steps)
        print(json.dumps(row))
        return
    os.environ["XLA_FLAGS"] = xla_flags.with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    import common  # imports jax: after the flags

    results = {
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **common.env_info(),
        "parts": {},
    }
    parts = {
        "flags": lambda: flags_part(opts.configs.split(","), opts.steps),
        "groupnorm": lambda: groupnorm_part(opts.reps),
        "groupnorm_step": lambda: groupnorm_step_part(opts.configs.split(","), opts.steps),
        "attention": lambda: attention_part(opts.reps),
        "devices": lambda: devices_part(2 * opts.steps),
    }
    for part in opts.parts.split(","):
        print(f"{part}:")
        results["parts"][part] = parts[part]()
        results["load_avg_after"] = os.getloadavg()
        common.dump(opts.out, results)
    print(f"JSON: {opts.out}")


if __name__ == "__main__":
    main()
