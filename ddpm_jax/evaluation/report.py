"""Evaluation of a run's parameters on its test split, and the end-of-run report.

The training loop calls these at its eval steps and once at the end; evaluate.py calls them on a
finished run. Every process computes (the bound is a collective); process 0 writes the files.
"""

from __future__ import annotations

import hashlib
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from ddpm_jax import fileio
from ddpm_jax.errors import DataError
from ddpm_jax.evaluation import plots
from ddpm_jax.training import distributed, train_lib


def load_split(config, split: str):
    """This process's shard of a split, uint8 [N, H, W, C] fitted to the config's image size (or a
    pipeline.StreamedSplit of that shape with config.data.in_memory=False), checked against the config."""
    from ddpm_jax.data import pipeline

    try:
        images = pipeline.load_images(
            config.data.dataset,
            split,
            config.data.data_dir,
            image_size=config.data.image_size,
            channels=config.data.channels,
            in_memory=config.data.get("in_memory", True),
        )
    except RuntimeError as e:  # not prepared and cannot be downloaded here
        raise DataError(str(e)) from e
    want = (config.data.image_size, config.data.image_size, config.data.channels)
    if images.shape[1:] != want:
        raise DataError(
            f"dataset {config.data.dataset!r} has images of shape {images.shape[1:]} but the config "
            f"says {want}: set config.data.image_size={images.shape[1]} and "
            f"config.data.channels={images.shape[3]}."
        )
    return images


def num_eval_batches(test_images: np.ndarray, global_batch: int) -> int:
    """Batches that cover this process's shard; every process must run the same number of eval
    steps, though their shards can differ by one image."""
    return distributed.max_over_processes(-(-len(test_images) // (global_batch // jax.process_count())))


def _sum_batches(step_fn, params, test_images, batch_size: int, rng, num_batches: int | None, progress: str = ""):
    sums = None
    from ddpm_jax.data import pipeline

    batches = pipeline.eval_batches(test_images, batch_size, num_batches=num_batches)
    if progress:
        batches = tqdm(list(batches), desc=progress, unit="batch", disable=not distributed.is_main_process())
    for batch, mask in batches:
        out = train_lib.unreplicate(step_fn(params, batch, mask, rng))
        sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
    return sums


def evaluate_loss(p_eval, params, test_images, config, rng, num_batches: int | None = None) -> dict:
    """The training loss (and its parts) over the whole test split, per example."""
    sums = _sum_batches(p_eval, params, test_images, config.training.batch_size, rng, num_batches)
    count = sums.pop("count")
    return {f"test_{k}": float(v / count) for k, v in sums.items()}


def evaluate_bpd(
    p_bpd, params, test_images, config, rng, batch_size: int | None = None, num_batches: int | None = None
) -> dict:
    """Negative ELBO over the whole test split in bits/dim, with its parts (and the per-t terms)."""
    sums = _sum_batches(
        p_bpd, params, test_images, batch_size or config.training.batch_size, rng, num_batches, progress="test bits/dim"
    )
    count = sums.pop("count")
    mean_sq = sums.pop("total_bpd_sq") / count
    result = {k: float(v / count) for k, v in sums.items() if k != "vb"}
    # Standard error of the mean over test images (with an estimate, its draws of t are part of the spread).
    result["total_bpd_se"] = float(np.sqrt(max(mean_sq - result["total_bpd"] ** 2, 0.0) / max(count - 1, 1)))
    if "vb" in sums:  # all T terms: L_0, the sum of L_{t-1}, and every term
        vb = sums["vb"] / count
        result.update(decoder_bpd=float(vb[0]), diffusion_bpd=float(vb[1:].sum()), vb_per_t=vb.tolist())
    result["num_examples"] = int(count)
    return result


def params_digest(params) -> str:
    """sha256 of the parameters' bytes: equal on every process of a healthy multi-process run."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def final_report(config, workdir: str, steps, rstate, test_images, eval_rng, writer, start_time: float) -> dict:
    """The end of a run: sample grid, denoising strip, curves and the test bound (EMA params), in
    <workdir>/results.json and PNGs beside it; returns the results."""
    is_main = distributed.is_main_process()
    results = {
        "step": int(train_lib.unreplicate(rstate.step)),
        "params_sha256": params_digest(train_lib.unreplicate(rstate.params)),
    }
    out = train_lib.draw_samples(
        steps.sample,
        rstate.ema_params,
        jax.random.fold_in(eval_rng, -1 % 2**31),
        config.sampling.num_samples,
        num_frames=10,
    )
    where = fileio.as_path(workdir)
    if is_main:
        fileio.save_npz(where / "samples.npz", samples=out["samples"])  # the arrays before any picture
        results["samples_png"] = plots.save_grid(out["samples"], where / "samples.png")
        writer.write_images(results["step"], {"samples/ema": plots.image_grid(out["samples"])})
        if "frames" in out:  # a method without a chain (the VAE) has none to show
            results["strip_png"] = plots.save_strip(out["frames"][:, :8], where / "denoising_strip.png")
            writer.write_images(results["step"], {"samples/denoising_strip": plots.strip_image(out["frames"][:, :8])})
        plots.plot_curves(writer.records(), ["loss", "test_loss"], where / "loss.png", "training loss")
    if config.training.final_bpd:
        # The bound costs T network calls per image: one large batch wastes the least on padding.
        bpd_batch = config.training.bpd_batch_size or config.training.batch_size
        bpd = evaluate_bpd(
            steps.bpd,
            rstate.ema_params,
            test_images,
            config,
            eval_rng,
            batch_size=bpd_batch,
            num_batches=num_eval_batches(test_images, bpd_batch),
        )
        vb_per_t = bpd.pop("vb_per_t", None)
        if is_main and vb_per_t is not None:
            plots.plot_vb_terms(vb_per_t, where / "bpd_terms.png", f"test bound: {bpd['total_bpd']:.3f} bits/dim")
        writer.write(results["step"], {f"test_{k}": v for k, v in bpd.items()})
        results.update(bpd, bpd_method=steps.method.bound_description(config.training.final_bpd_strata))
    results["wall_time_s"] = time.time() - start_time
    if is_main:
        fileio.atomic_write_json(where / "results.json", results)
    return results
