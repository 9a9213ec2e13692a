"""Input-pipeline throughput: images per second that pipeline.train_batches delivers, per number of host cores.

Batch 128 (one device), through the real train_batches path (NumPy order, PIL decoding, no TensorFlow):
  memory  -- a synthetic in-memory split of 50,000 32x32x3 images (CIFAR-10's size), random flips;
  tfds    -- streamed (in_memory=False) from a tfds dataset of PNG-encoded 32x32x3 images stored as ArrayRecord,
             random flips;
  folder  -- streamed from a folder of 32x32x3 PNG files, random flips;
  digits  -- the in-memory 8x8x1 digits (the main job's data), no flips (as configs/ddpm.py).
Each (source, cores) cell runs in its own process pinned to that many cores (sched_setaffinity before the
pipeline starts; the streamed sources decode on sources.pool(), whose threads then share those cores).
Timed: the batches after a warm-up, as the training loop takes them (float32 [1, 128, H, W, C] NumPy arrays).

  python bench/input_pipeline.py                  # cores 1 and 2, ~2 minutes on 2 busy cores
  python bench/input_pipeline.py --cores=1,2,4,8  # on a bigger host

Prints a table and writes bench/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, BATCH, MEMORY_IMAGES = 32, 128, 50_000
DEVICE_IMAGES_PER_SEC = 7_500  # an H200 training CIFAR-10 in bf16 (bench/RESULTS.md)
SOURCES = ("memory", "tfds", "folder", "digits")


def _synthetic(n: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _prepare_sources(root: str, n: int) -> None:
    """The sources under root: tfds/ (ArrayRecord dataset "bench_pictures", and the digits) and folder/ (PNGs)."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    from ddpm_jax.data import pipeline

    images = _synthetic(n, seed=1)
    os.makedirs(os.path.join(root, "folder"))
    encoded = []
    for i, x in enumerate(images):
        png = io.BytesIO()
        Image.fromarray(x).save(png, format="PNG")
        encoded.append(png.getvalue())
        with open(os.path.join(root, "folder", f"{i:06d}.png"), "wb") as f:
            f.write(encoded[-1])
    tfds.dataset_builders.store_as_tfds_dataset(  # PNG bytes: tfds would encode arrays with TensorFlow
        name="bench_pictures",
        version="1.0.0",
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(SIZE, SIZE, 3))}),
        split_datasets={"train": [(i, {"image": x}) for i, x in enumerate(encoded)]},
        data_dir=os.path.join(root, "tfds"),
        file_format="array_record",
    )
    pipeline.load_images("digits", "train", os.path.join(root, "tfds"), 0, 1)  # prepared once


def _worker(source: str, cores: int, root: str, seconds: float) -> dict:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])  # before any thread starts
    from ddpm_jax.data import pipeline

    flip = source != "digits"
    if source == "memory":
        images = _synthetic(MEMORY_IMAGES)
    elif source == "digits":
        images = pipeline.load_images("digits", "train", os.path.join(root, "tfds"), 0, 1)
    else:
        name = {"tfds": "bench_pictures", "folder": f"folder:{root}/folder"}[source]
        kw = {"data_dir": os.path.join(root, "tfds")} if source == "tfds" else {}
        images = pipeline.load_images(
            name, "train", **kw, process_index=0, process_count=1, image_size=SIZE, channels=3, in_memory=False
        )
    batches = pipeline.train_batches(images, BATCH, seed=0, random_flip=flip, num_local_devices=1, process_count=1)
    for _ in range(20):  # warm-up: tracing, AUTOTUNE, the prefetch buffer
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        n += 1
    elapsed = time.perf_counter() - start
    assert batch.shape == (1, BATCH, *images.shape[1:])
    # Paced like the training loop on a device that takes DEVICE_IMAGES_PER_SEC: a step's compute (a sleep,
    # which like JAX's async dispatch leaves the cores to the pipeline), then next(); how long does next() wait?
    step_s, waits = BATCH / DEVICE_IMAGES_PER_SEC, []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 2:
        time.sleep(step_s)
        t = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - t)
    return {
        "source": source,
        "cores": cores,
        "random_flip": flip,
        "image_shape": list(images.shape[1:]),
        "batches": n,
        "seconds": elapsed,
        "images_per_sec": n * BATCH / elapsed,
        "paced_wait_ms_mean": 1e3 * sum(waits) / len(waits),
        "paced_wait_fraction": sum(waits) / (sum(waits) + step_s * len(waits)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="1,2", help="comma-separated core counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell (and half that paced)")
    parser.add_argument("--stream_images", type=int, default=5_000, help="images in the streamed sources")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "input_pipeline.json"))
    parser.add_argument("--worker", nargs=3, metavar=("SOURCE", "CORES", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        source, cores, root = args.worker
        print(json.dumps(_worker(source, int(cores), root, args.seconds)))
        return
    cores = [int(c) for c in args.cores.split(",")]
    available = len(os.sched_getaffinity(0))
    if max(cores) > available:
        sys.exit(f"--cores asks for {max(cores)} cores; this process may use {available}.")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        _prepare_sources(root, args.stream_images)
        prepare_s = time.perf_counter() - t
        for source in SOURCES:
            for k in cores:
                cmd = [sys.executable, __file__, f"--seconds={args.seconds}", "--worker", source, str(k), root]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"{source:>7} {k:>3} cores: {r['images_per_sec']:>9,.0f} img/s; paced at "
                    f"{DEVICE_IMAGES_PER_SEC:,} img/s, next() waits {r['paced_wait_ms_mean']:.2f} ms "
                    f"({100 * r['paced_wait_fraction']:.1f}% of the step)",
                    flush=True,
                )
    print(f"\n| source | {' | '.join(f'{k} core(s)' for k in cores)} |")
    print(f"|---|{'---|' * len(cores)}")
    for source in SOURCES:
        cells = [
            f"{r['images_per_sec']:,.0f} img/s, waits {100 * r['paced_wait_fraction']:.1f}%"
            for k in cores
            for r in rows
            if r["source"] == source and r["cores"] == k
        ]
        print(f"| {source} | {' | '.join(cells)} |")
    print(f"(waits: share of each step that next() waits when the device takes {DEVICE_IMAGES_PER_SEC:,} img/s)")
    result = {
        "what": "images/s from pipeline.train_batches: 32x32x3 uint8 with random flips (digits: 8x8x1, no flips), "
        "batch 128, float32 out; "
        f"paced_*: next()'s wait when each step also takes {BATCH}/{DEVICE_IMAGES_PER_SEC} s of (simulated) device time",
        "host": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "memory_images": MEMORY_IMAGES,
        "stream_images": args.stream_images,
        "prepare_streamed_sources_s": prepare_s,
        "seconds_per_cell": args.seconds,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
