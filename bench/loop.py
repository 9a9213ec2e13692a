"""The real training loop's speed beside the bare step (issue 22).

`ddpm_jax.training.loop.train_and_evaluate` runs on synthetic images (uniform uint8 of the config's shape, through
the real input pipeline: `splits.load_split`, `load_train` and `load_validation` are the only things replaced) and is timed over a window of steps in
its steady state: from the call of step `warmup` to the end of step `warmup + steps` (its output waited for).
The bare loop is the same compiled `p_train`, called back to back on one device-resident batch with one wait at
the end, as bench/common.py's "pipelined" step. The two alternate, `--repeats` times each, and the medians are
compared: overhead = real / bare - 1.

Where the overhead comes from: the host time the loop spends in each of its parts between steps, summed over the
window (the next batch from the pipeline, the non-finite flags' fetch, the log action, the stop check). A fetch
waits for the device, so its time is mostly the device finishing queued steps; what the loop loses is the queue it
drains (after a fetch the device idles while the host sends the next step).

The periodic actions that fall outside the window (the validation loss, the best checkpoint it may save, a sample
grid, a checkpoint) are timed once
each on the digits config and shown amortized over their interval (`--amortized`); they are work the user asked
for, not loop overhead.

  python bench/loop.py                                  # vdm (the main job) and cifar10 at batch 8, on the CPU
  python bench/loop.py --configs cifar10:h100 --batch 0 --steps 100   # on a GPU (bench/gpu.sh --loop)

Prints a table; writes JSON to --out (default bench/out/loop.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import gpu_bench  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import configuration, methods  # noqa: E402
from ddpm_jax.data import splits  # noqa: E402
from ddpm_jax.training import distributed, guards, loop, train_lib  # noqa: E402


class Timers:
    """Host seconds spent in each named part of the loop, and the time of each p_train call."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.calls: list[float] = []
        self.end = None

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds


@contextlib.contextmanager
def patched(obj, name: str, new):
    old = getattr(obj, name)
    setattr(obj, name, new)
    try:
        yield old
    finally:
        setattr(obj, name, old)


def timed_method(timers: Timers, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.add(name, time.perf_counter() - t0)

    return wrapper


def synthetic_split(config, num_images: int):
    """A stand-in for splits.load_split: uniform uint8 images of the config's shape (fixed seed per split)."""
    shape = (num_images, config.data.image_size, config.data.image_size, config.data.channels)

    def load_split(cfg, split, **shard):
        seed = {cfg.data.train_split: 0, "validation": 2}.get(split, 1)
        return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)

    return load_split


def synthetic_splits(config, num_images: int) -> dict:
    """Stand-ins for splits.load_split, load_train and load_validation (the training and validation sets
    are synthetic splits of their own: no holdout is computed)."""
    load_split = synthetic_split(config, num_images)
    return {
        "load_split": load_split,
        "load_train": lambda cfg, **shard: load_split(cfg, cfg.data.train_split),
        "load_validation": lambda cfg, **shard: load_split(cfg, "validation"),
    }


def real_loop(config, steps_fns, warmup: int, steps: int, num_images: int) -> dict:
    """Seconds per step of train_and_evaluate over steps warmup+1 .. warmup+steps, and where the host spent them."""
    timers = Timers()
    last = warmup + steps
    p_train = steps_fns.p_train

    def timed_train(rstate, batch):
        n = len(timers.calls) + 1  # the step this call computes
        if n > warmup:
            timers.calls.append(time.perf_counter())
        else:
            timers.calls.append(None)
        out = p_train(rstate, batch)
        if n == last:
            jax.block_until_ready(out)
            timers.end = time.perf_counter()
        return out

    timed_steps = dataclasses.replace(steps_fns, p_train=timed_train)

    def in_window():
        return timers.calls and timers.calls[-1] is not None and timers.end is None

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if in_window():
                    timers.add(name, time.perf_counter() - t0)

        return wrapper

    original_load_data = loop._load_data

    def load_data(cfg, initial_step):
        batches, val_images, num_eval_batches = original_load_data(cfg, initial_step)

        def timed_batches():
            while True:
                t0 = time.perf_counter()
                batch = next(batches)
                if in_window():
                    timers.add("next batch (input pipeline)", time.perf_counter() - t0)
                yield batch

        return timed_batches(), val_images, num_eval_batches

    config = config.copy_and_resolve_references()
    config.training.num_train_steps = last + 1
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:
        for name, fn in synthetic_splits(config, num_images).items():
            stack.enter_context(patched(splits, name, fn))
        stack.enter_context(patched(loop, "_load_data", load_data))
        for obj, name, label in (
            (guards.NonfiniteGuard, "check", "non-finite flags fetch"),
            (loop._Logger, "__call__", "log action"),
            (loop._StopCheck, "__call__", "stop check"),
        ):
            stack.enter_context(patched(obj, name, counted(label, getattr(obj, name))))
        out = loop.train_and_evaluate(config, os.path.join(workdir, "run"), stop_at_step=last, steps=timed_steps)
    assert out.get("stopped_at") == last, out
    seconds = timers.end - timers.calls[warmup]
    return {"step_s": seconds / steps, "parts_s_per_step": {k: v / steps for k, v in timers.parts.items()}}


def bare_loop(steps_fns, method, config, steps: int) -> float:
    """Seconds per step of p_train called back to back on one device-resident batch, one wait at the end."""
    state = train_lib.create_train_state(
        method, steps_fns.tx, jax.random.PRNGKey(config.seed), flat=config.optim.flatten
    )
    rstate = distributed.replicate(state)
    ndev = jax.local_device_count()
    size, ch = config.data.image_size, config.data.channels
    host = np.random.default_rng(0).uniform(-1, 1, (ndev, config.training.batch_size // ndev, size, size, ch))
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (train_lib.AXIS,))  # one shard per device, as a loader's
    batch = jax.device_put(
        host.astype(np.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train_lib.AXIS))
    )
    for _ in range(2):  # warm-up (compiled already by the real loop)
        rstate, _ = steps_fns.p_train(rstate, batch)
    jax.block_until_ready(rstate)
    t0 = time.perf_counter()
    for _ in range(steps):
        rstate, _ = steps_fns.p_train(rstate, batch)
    jax.block_until_ready(rstate)
    return (time.perf_counter() - t0) / steps


def amortized_actions(config, steps_fns) -> dict:
    """One validation-loss evaluation, best checkpoint, sample grid and checkpoint of the config, each over its
    interval (s/step; the best checkpoint is saved at an eval step only when the validation value improves, so
    its interval is eval_every at the most often)."""
    from ddpm_jax.evaluation import report
    from ddpm_jax.training import checkpoint
    from ddpm_jax.training.metric_writer import MetricWriter

    load = synthetic_split(config, 512)
    val_images = load(config, "validation")
    state = train_lib.create_train_state(steps_fns.method, steps_fns.tx, jax.random.PRNGKey(0))
    rstate = distributed.replicate(state)
    rng = jax.random.PRNGKey(1)
    tr = config.training
    out = {}
    with tempfile.TemporaryDirectory() as workdir:
        writer = MetricWriter(workdir)
        mngr = checkpoint.make_manager(workdir, tr.keep_checkpoints)
        actions = {
            "validation loss": (
                tr.eval_every,
                lambda: report.evaluate_loss(
                    steps_fns.p_eval,
                    rstate.ema_params,
                    images=val_images,
                    config=config,
                    rng=rng,
                    num_batches=report.num_eval_batches(val_images, tr.batch_size),
                ),
            ),
            "best checkpoint": (tr.eval_every, lambda: save_best_at_next_step()),
            "sample grid": (
                tr.sample_every,
                lambda: loop._sample_grid(steps_fns, rstate, rng, 1, config, workdir, writer),
            ),
            "checkpoint": (tr.checkpoint_every, lambda: save_at_next_step()),
        }
        saved = [0]
        best_mngr = checkpoint.make_best_manager(workdir)

        def save_best_at_next_step():
            saved[0] += 1
            best = checkpoint.Best(saved[0], "val_bpd_est", 1.0 / saved[0])
            checkpoint.save_best(best_mngr, best, distributed.unreplicate(rstate.ema_params))

        def save_at_next_step():  # a new step each time: Orbax skips a step it holds already
            saved[0] += 1
            checkpoint.save(mngr, distributed.unreplicate(rstate).replace(step=saved[0]))
            checkpoint.wait_until_finished(mngr)

        for name, (interval, action) in actions.items():
            action()  # compiles
            t0 = time.perf_counter()
            jax.block_until_ready(action())
            seconds = time.perf_counter() - t0
            out[name] = {"seconds": seconds, "every": interval, "s_per_step": seconds / interval}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="vdm,cifar10", help="comma-separated config names (with :variant)")
    ap.add_argument("--batch", type=int, default=8, help="cifar10's batch on this CPU (0: the config's own)")
    ap.add_argument("--steps", default="vdm=200,cifar10=40", help="timed steps per config: name=N,... or one N")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, the queue filling)")
    ap.add_argument("--repeats", type=int, default=2, help="bare/real pairs, alternating")
    ap.add_argument("--amortized", action="store_true", help="also time the periodic actions once (digits only)")
    ap.add_argument(
        "--model-gflops",
        type=float,
        default=35.0075,
        help="cifar10 UNet fwd+bwd GFLOP/image (XLA:CPU's cost analysis, bench/RESULTS.md) for the MFU on a GPU",
    )
    ap.add_argument("--out", default=os.path.join(common.REPO, "bench", "out", "loop.json"))
    args = ap.parse_args()

    steps_for = {}
    for item in args.steps.split(","):
        name, _, n = item.rpartition("=")
        steps_for[name or "*"] = int(n)
    res = {"env": common.env_info(), "args": vars(args), "configs": {}}
    for spec in args.configs.split(","):
        config = configuration.load_config_file(spec)
        if spec.startswith("cifar10") and args.batch:
            config.training.batch_size = args.batch
        steps = steps_for.get(spec, steps_for.get(spec.partition(":")[0], steps_for.get("*", 50)))
        method = methods.from_config(config)
        steps_fns = train_lib.compile_steps(method, config)
        num_images = max(4 * config.training.batch_size, 512)
        bare, real, parts = [], [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(steps_fns, method, config, steps))
            r = real_loop(config, steps_fns, args.warmup, steps, num_images)
            real.append(r["step_s"])
            parts.append(r["parts_s_per_step"])
        row = {
            "batch": config.training.batch_size,
            "steps": steps,
            "bare_step_s": bare,
            "real_step_s": real,
            "bare_median_s": statistics.median(bare),
            "real_median_s": statistics.median(real),
            "overhead": statistics.median(real) / statistics.median(bare) - 1,
            "pair_overheads": [r / b - 1 for r, b in zip(real, bare)],
            "parts_s_per_step": {k: statistics.median(p.get(k, 0.0) for p in parts) for k in parts[0]},
            "log_every": config.training.log_every,
            "max_nonfinite_steps": config.training.max_nonfinite_steps,
        }
        row["images_per_s"] = row["batch"] / row["real_median_s"]
        row["device_peak_mb"] = common.device_peak_mb()
        _, (bf16_peak, tf32_peak) = gpu_bench.peaks_for(res["env"]["device_kind"])
        peak = bf16_peak if config.model.dtype == "bfloat16" else tf32_peak
        if spec.startswith("cifar10") and peak:  # model FLOPs over the card's dense peak (bench/gpu_bench.py)
            row["mfu_pct"] = 100.0 * args.model_gflops * 1e9 * row["images_per_s"] / (peak * 1e12)
            row["bare_mfu_pct"] = row["mfu_pct"] * row["real_median_s"] / row["bare_median_s"]
        if args.amortized and config.data.dataset == "digits":
            row["amortized"] = amortized_actions(config, steps_fns)
        res["configs"][spec] = row
        common.dump(args.out, res)

    print(f"\n{'config':<14}{'batch':>6}{'steps':>6}{'bare s/step':>13}{'loop s/step':>13}{'overhead':>10}  pairs")
    for spec, row in res["configs"].items():
        pairs = ", ".join(f"{o:+.1%}" for o in row["pair_overheads"])
        print(
            f"{spec:<14}{row['batch']:>6}{row['steps']:>6}{row['bare_median_s']:>13.4f}"
            f"{row['real_median_s']:>13.4f}{row['overhead']:>+10.1%}  {pairs}"
        )
        if "mfu_pct" in row:
            print(
                f"    MFU {row['mfu_pct']:.1f}% (bare {row['bare_mfu_pct']:.1f}%), device peak {row['device_peak_mb']} MB"
            )
        for part, s in row["parts_s_per_step"].items():
            print(f"    host time in {part}: {s * 1e3:.2f} ms/step ({s / row['bare_median_s']:.1%} of a bare step)")
        for name, a in row.get("amortized", {}).items():
            print(
                f"    {name}: {a['seconds']:.2f} s every {a['every']} steps = "
                f"{a['s_per_step'] / row['bare_median_s']:.1%} of a bare step"
            )
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
