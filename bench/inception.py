"""FID Inception features, images/s: ddpm_jax vs torch-fidelity 0.4.0, side by side in one process.

Both get the same uint8 batch (32x32 RGB by default, so the whole 299x299 network runs after the
resize) and the same random weights in the real file's format (tests/helpers/torch_fidelity_ref);
each timed call includes the resize and the features' return to the host. Calls alternate
(ddpm_jax first on even reps, torch first on odd ones) after one warm-up each; the table gives the
median over reps. XLA runs with ddpm_jax's CPU flags (ddpm_jax.xla_flags, as the entry points do);
torch with torch.set_num_threads(cpu count).

Also prints XLA's FLOP count of the network per image and, from it, an estimate for 50k images on
one H100 (see estimate_h100).

    python bench/inception.py [--batch 32] [--reps 5] [--size 32] [--out bench/results/inception.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from ddpm_jax import xla_flags  # noqa: E402  (jax is not imported yet)

xla_flags.configure()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpm_jax.evaluation import inception, inception_weights  # noqa: E402

from helpers import torch_fidelity_ref as ref  # noqa: E402

# H100 SXM: 67 TFLOP/s dense FP32 on the CUDA cores (NVIDIA's datasheet). The network runs at
# Precision.HIGHEST, so no TF32 tensor cores; cuDNN's FP32 convolutions reach about half of that peak
# on large batches of Inception-sized layers (our assumption, not measured here: no GPU on this machine).
H100_FP32_PEAK = 67e12
ASSUMED_FRACTION = 0.5


def estimate_h100(flops_per_image: float, n: int = 50_000) -> dict:
    seconds = n * flops_per_image / (H100_FP32_PEAK * ASSUMED_FRACTION)
    return {
        "images": n,
        "flops_per_image": flops_per_image,
        "peak_flops": H100_FP32_PEAK,
        "assumed_fraction_of_peak": ASSUMED_FRACTION,
        "seconds": seconds,
    }


def network_flops() -> float:
    """XLA's cost analysis of the network on one 299x299 image (a multiply-add counts 2)."""
    shapes = inception.init_shapes()
    x = jax.ShapeDtypeStruct((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), np.float32)
    cost = jax.jit(inception.apply_network).lower(shapes, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="input images are size x size RGB")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "inception.json"))
    opts = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    with tempfile.TemporaryDirectory() as tmp:
        path = ref.write_random_inception_pth(os.path.join(tmp, "random.pth"), seed=0)
        params = inception_weights.load_inception_params(path)
        extractor = ref.reference_extractor(path)
    images = np.random.default_rng(0).integers(0, 256, (opts.batch, opts.size, opts.size, 3), dtype=np.uint8)
    runs = {
        "ddpm_jax": lambda: inception.inception_features(params, images, per_device_batch=opts.batch),
        "torch-fidelity": lambda: ref.reference_features(extractor, images),
    }
    warmup = {name: timed(fn) for name, fn in runs.items()}  # ddpm_jax's includes its compile
    ours, theirs = runs["ddpm_jax"](), runs["torch-fidelity"]()
    max_rel_err = float(np.max(np.abs(ours["pool"] - theirs["pool"])) / np.max(np.abs(theirs["pool"])))
    times = {name: [] for name in runs}
    load_before = os.getloadavg()
    for rep in range(opts.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            times[name].append(timed(runs[name]))
    rate = {name: opts.batch / statistics.median(t) for name, t in times.items()}
    flops = network_flops()
    result = {
        "batch": opts.batch,
        "image_size": opts.size,
        "reps": opts.reps,
        "images_per_s": rate,
        "ratio_ddpm_jax_over_torch_fidelity": rate["ddpm_jax"] / rate["torch-fidelity"],
        "seconds_per_call": times,
        "warmup_seconds": warmup,
        "pool_max_rel_err": max_rel_err,
        "h100_estimate": estimate_h100(flops),
        "load_average_before_after": [load_before, os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "devices": [str(d) for d in jax.local_devices()],
    }
    print(f"FID Inception features, {opts.batch} images of {opts.size}x{opts.size} RGB per call, median of {opts.reps}")
    print(f"{'':16} {'images/s':>9} {'s/call':>8}")
    for name in runs:
        print(f"{name:16} {rate[name]:9.2f} {statistics.median(times[name]):8.2f}")
    print(f"ratio ddpm_jax / torch-fidelity: {result['ratio_ddpm_jax_over_torch_fidelity']:.2f}x")
    print(
        f"pool features max rel err: {max_rel_err:.2e}; load average before/after: {result['load_average_before_after']}"
    )
    est = result["h100_estimate"]
    print(
        f"network: {flops / 1e9:.2f} GFLOP/image (XLA count, multiply-add = 2); 50k images on one H100 at "
        f"{ASSUMED_FRACTION:.0%} of {H100_FP32_PEAK / 1e12:.0f} TFLOP/s FP32: ~{est['seconds']:.0f} s"
    )
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
