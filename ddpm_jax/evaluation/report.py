"""Evaluation of a run's parameters on a split, and the end-of-run report.

The training loop calls `evaluate_loss` on the validation split at its eval steps and `final_report`
(the test split) once at the end;
evaluate.py calls `evaluate_bpd` on a finished run. Every process computes (the bound is a
collective); process 0 writes the files.

The end-of-run report is a list of small evaluators (`FINAL_EVALUATORS`), each a function of a
`FinalContext` that writes its files and returns its numbers for results.json; the config chooses
them (`final_evaluators`): the samples (grid, denoising strip), the curves, and, when
config.training.final_bpd, the validation bound (val_total_bpd: what ddpm-ablate chooses its best cell by)
and the test bound (read once, here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import fileio
from ddpm_jax.evaluation import plots, sample_lib
from ddpm_jax.training import distributed
from ddpm_jax.training.progress import iterate

if TYPE_CHECKING:  # annotations only
    from ddpm_jax.training.metric_writer import MetricWriter
    from ddpm_jax.training.train_lib import CompiledSteps


def num_eval_batches(images, global_batch: int) -> int:
    """Batches that cover this process's shard; every process must run the same number of eval
    steps, though their shards can differ by one image."""
    return distributed.max_over_processes(-(-len(images) // (global_batch // jax.process_count())))


def _sum_batches(step_fn, params, images, batch_size: int, rng, num_batches: int | None, progress: str = ""):
    """Sums of step_fn's outputs over the eval batches of images; batch i gets the key fold_in(rng, i), so
    every batch draws its own t and eps (one shared key would repeat them by position: their errors would
    be correlated and the standard error over images understated)."""
    sums = None
    from ddpm_jax.data import pipeline

    batches = pipeline.eval_batches(images, batch_size, num_batches=num_batches)
    if progress:
        batches = iterate(batches, desc=progress, unit="batch", enabled=distributed.is_main_process())
    per_example = []
    for i, (batch, mask) in enumerate(batches):
        out = distributed.unreplicate(step_fn(params, batch, mask, jax.random.fold_in(rng, i)))
        each = out.pop("per_example", None)  # per-example values (bpd_step): kept in order, not summed
        if each is not None:
            per_example.append(np.asarray(each["total_bpd"], np.float64)[np.asarray(each["mask"]) > 0])
        sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
    if per_example:
        sums["per_example_total_bpd"] = np.concatenate(per_example)
    return sums


def evaluate_loss(p_eval, params, images, config, rng, num_batches: int | None = None, prefix: str = "val") -> dict:
    """The training loss (and its parts, and bpd_est) over a whole split, per example, as {prefix}_<name>:
    the loop's eval steps run it on the validation split (val_loss, val_bpd_est, ...)."""
    sums = _sum_batches(p_eval, params, images, config.training.batch_size, rng, num_batches)
    count = sums.pop("count")
    return {f"{prefix}_{k}": float(v / count) for k, v in sums.items()}


def evaluate_bpd(
    p_bpd,
    params,
    test_images,
    config,
    rng,
    batch_size: int | None = None,
    num_batches: int | None = None,
    per_image: bool = False,
    progress: str = "test bits/dim",
) -> dict:
    """Negative ELBO over the whole test split in bits/dim, with its parts (and the per-t terms).

    With per_image, also "total_bpd_per_image": float64 [images] every test image's total, in the
    split's order (all processes' images: the global batches, devices in order); with the same config.seed
    (so the same rng), batch size, device count and bound, two runs draw the same t and eps for an image.
    """
    sums = _sum_batches(
        p_bpd, params, test_images, batch_size or config.training.batch_size, rng, num_batches, progress=progress
    )
    each = sums.pop("per_example_total_bpd", None)
    count = sums.pop("count")
    mean_sq = sums.pop("total_bpd_sq") / count
    result = {k: float(v / count) for k, v in sums.items() if k != "vb"}
    # Standard error of the mean over test images (with an estimate, its draws of t are part of the spread).
    result["total_bpd_se"] = float(np.sqrt(max(mean_sq - result["total_bpd"] ** 2, 0.0) / max(count - 1, 1)))
    if "vb" in sums:  # all T terms: L_0, the sum of L_{t-1}, and every term
        vb = sums["vb"] / count
        result.update(decoder_bpd=float(vb[0]), diffusion_bpd=float(vb[1:].sum()), vb_per_t=vb.tolist())
    result["num_examples"] = int(count)
    if per_image and each is not None:
        result["total_bpd_per_image"] = each
    return result


def params_digest(params) -> str:
    """sha256 of the parameters' bytes: equal on every process of a healthy multi-process run."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class FinalContext:
    """What the end-of-run evaluators read: the run's config, workdir, steps and replicated state (its EMA
    params: the selected ones), its test split, the evaluation key, the metric writer, the final step and
    the validation split."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    steps: CompiledSteps
    rstate: Any  # replicated train_lib.TrainState
    test_images: Any
    eval_rng: jax.Array
    writer: MetricWriter
    step: int
    is_main: bool
    val_images: Any = None


def final_samples(ctx: FinalContext) -> dict:
    """The EMA params' samples with their denoising frames: samples.npz (the arrays), the grid
    samples.png and denoising_strip.png (where the method has a chain; its columns labelled with
    their t), scaled up to be seen (plots.grid_picture), and at pixel size as TensorBoard images."""
    out = sample_lib.draw_samples(
        ctx.steps.p_sample,
        ctx.rstate.ema_params,
        jax.random.fold_in(ctx.eval_rng, -1 % 2**31),
        ctx.config.sampling.num_samples,
        num_frames=10,
    )
    if not ctx.is_main:
        return {}
    fileio.save_npz(ctx.workdir / "samples.npz", samples=out["samples"])  # the arrays before any picture
    results = {"samples_png": plots.save_grid(out["samples"], ctx.workdir / "samples.png")}
    ctx.writer.write_images(ctx.step, {"samples/ema": plots.image_grid(out["samples"])})
    if "frames" in out:  # a method without a chain (the VAE) has none to show
        results["strip_png"] = plots.save_strip(
            out["frames"][:, :8], ctx.workdir / "denoising_strip.png", frame_t=out.get("frame_t")
        )
        ctx.writer.write_images(ctx.step, {"samples/denoising_strip": plots.strip_image(out["frames"][:, :8])})
    return results


def final_curves(ctx: FinalContext) -> dict:
    """loss.png: the training and test loss over the run (from the metric writer's records), on a
    log axis in the method's loss unit (with the test bound in bits/dim beside a loss that is not)."""
    if ctx.is_main:
        plots.plot_loss(ctx.writer.records(), ctx.workdir / "loss.png", loss_unit=ctx.steps.method.loss_unit())
    return {}


BOUND_PER_IMAGE = "bound_per_image.npz"


def _bound_batch(config) -> int:
    """The final bound's batch: it costs T network calls per image, so one large batch wastes the least on padding."""
    return config.training.bpd_batch_size or config.training.batch_size


def _split_bound(ctx: FinalContext, images, rng, progress: str, per_image: bool = False) -> dict:
    """The selected EMA params' bound over a whole split (evaluate_bpd with the final bound's batch)."""
    bpd_batch = _bound_batch(ctx.config)
    return evaluate_bpd(
        ctx.steps.p_bpd,
        ctx.rstate.ema_params,
        images,
        ctx.config,
        rng,
        batch_size=bpd_batch,
        num_batches=num_eval_batches(images, bpd_batch),
        per_image=per_image,
        progress=progress,
    )


def final_bound(ctx: FinalContext) -> dict:
    """The EMA params' test bound in bits/dim (steps.p_bpd: config.training.final_bpd_strata), with
    bpd_terms.png when it has all T terms; also written as test_* metrics. Every test image's total
    goes to bound_per_image.npz (`total_bpd` [images], in the split's order, with the draws' seed,
    batch size, strata and device count: runs that agree on those drew the same t and eps per image)."""
    config = ctx.config
    bpd_batch = _bound_batch(config)
    bpd = _split_bound(ctx, ctx.test_images, ctx.eval_rng, "test bits/dim", per_image=True)
    vb_per_t = bpd.pop("vb_per_t", None)
    per_image = bpd.pop("total_bpd_per_image", None)
    if ctx.is_main and per_image is not None:  # for differences paired by image (ddpm-ablate)
        fileio.save_npz(
            ctx.workdir / BOUND_PER_IMAGE,
            total_bpd=per_image,
            seed=np.int64(config.seed),  # the draws' key: PRNGKey(seed + 1)
            batch_size=np.int64(bpd_batch),
            strata=np.int64(config.training.final_bpd_strata),
            devices=np.int64(jax.device_count()),
        )
    if ctx.is_main and vb_per_t is not None:
        plots.plot_vb_terms(vb_per_t, ctx.workdir / "bpd_terms.png", f"test bound: {bpd['total_bpd']:.3f} bits/dim")
    ctx.writer.write(ctx.step, {f"test_{k}": v for k, v in bpd.items()})
    return {**bpd, "bpd_method": ctx.steps.method.bound_description(config.training.final_bpd_strata)}


def final_val_bound(ctx: FinalContext) -> dict:
    """The EMA params' bound on the validation split, computed like the test bound (final_bound), as
    val_total_bpd, val_total_bpd_se and val_num_examples: the number a choice between runs is made by."""
    if ctx.val_images is None:
        return {}
    bpd = _split_bound(ctx, ctx.val_images, jax.random.fold_in(ctx.eval_rng, 1), "validation bits/dim")
    keep = ("total_bpd", "total_bpd_se", "num_examples")
    numbers = {f"val_{k}": bpd[k] for k in keep if k in bpd}
    ctx.writer.write(ctx.step, {k: v for k, v in numbers.items() if k != "val_num_examples"})
    return numbers


FINAL_EVALUATORS: dict[str, Callable[[FinalContext], dict]] = {
    "samples": final_samples,
    "curves": final_curves,
    "val_bound": final_val_bound,
    "bound": final_bound,
}


def final_evaluators(config: ml_collections.ConfigDict) -> list[str]:
    """The names of the evaluators a run ends with, in order: the samples and the curves, then the
    validation bound and the test bound when config.training.final_bpd."""
    return ["samples", "curves"] + (["val_bound", "bound"] if config.training.final_bpd else [])


def final_report(
    *,
    config: ml_collections.ConfigDict,
    workdir: str,
    steps: CompiledSteps,
    rstate,
    test_images,
    eval_rng: jax.Array,
    writer: MetricWriter,
    start_time: float,
    selection: dict | None = None,
    val_images=None,
) -> dict:
    """The end of a run: the config's `final_evaluators` on the EMA params (the selected ones: the loop
    hands over the best step's with keep_best), their numbers in <workdir>/results.json (with the step, the
    raw params' digest, the selection: selected_step, selected_by and selected_value, each evaluator's seconds
    as final_report_s, and the wall time) and
    their files beside it; returns the results."""
    is_main = distributed.is_main_process()
    step = int(distributed.unreplicate(rstate.step))
    results = {"step": step, "params_sha256": params_digest(distributed.unreplicate(rstate.params))}
    results.update(selection or {"selected_step": step, "selected_by": "last step"})
    ctx = FinalContext(
        config=config,
        workdir=fileio.as_path(workdir),
        steps=steps,
        rstate=rstate,
        test_images=test_images,
        eval_rng=eval_rng,
        writer=writer,
        step=step,
        is_main=is_main,
        val_images=val_images,
    )
    seconds = {}
    for name in final_evaluators(config):
        began = time.time()
        results.update(FINAL_EVALUATORS[name](ctx))
        seconds[name] = round(time.time() - began, 2)  # compiles included: where a run's last minutes go
    results["final_report_s"] = seconds
    results["wall_time_s"] = time.time() - start_time
    if is_main:
        fileio.atomic_write_json(ctx.workdir / "results.json", results)
    return results
