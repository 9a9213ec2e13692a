"""Evaluates a trained run: the test (or validation) bound in bits/dim (all T terms) and sample quality.

    python -m ddpm_jax.evaluate --workdir=runs/default [--params=ema|raw|best] [--split=test|validation]
        [--num_samples=500] [--sampler=respaced --steps=100] [--nobpd] [--noquality]
        [--ode_images=297 --ode_steps=64]
        [--fid [--fid_reference=cifar10:train|folder:PATH|stats.npz] [--inception_weights=PATH]]

--split chooses the split the bound and the ODE NLL are computed on: "test" (the default: the number to
report, once, for the chosen params) or "validation" (the run's validation split, data.splits: for
choices, e.g. of a sampler or a checkpoint). --params=best scores the EMA params the run kept for its
best validation value (training.keep_best: what its final report used).

Writes <workdir>/eval/<params>.json (<params>_validation.json for --split=validation; and the per-t plot
bpd_terms_<params>.png, the grid of the samples scored, samples_<params>.png) and prints the numbers. Sample quality for the digits is the
digits-classifier Fréchet distance ("fd": a small classifier's feature space, not FID), its
classifier score, and the train-vs-test floor. --fid scores num_samples samples drawn with the run's
default sampler (or --sampler where given) by FID, Inception Score and KID against the reference's
statistics (default: the run's train split; ddpm_jax.evaluation.fid), and also writes them to
<workdir>/results.json and to the run's metrics (TensorBoard).
"""

from __future__ import annotations

import json
import time

import jax
from absl import flags

from ddpm_jax import fileio, methods
from ddpm_jax.commands import cli
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import plots, report, sample_lib
from ddpm_jax.run import WHICH, load_run
from ddpm_jax.training import distributed, train_lib

SPLITS = ("test", "validation")  # --split


def evaluate_workdir(
    workdir: str,
    *,
    params: str = "ema",
    bpd: bool = True,
    quality: bool = True,
    num_samples: int = 500,
    sampler: str = "respaced",
    num_steps: int | None = 100,
    eta: float = 0.0,
    seed: int = 0,
    bpd_batch_size: int | None = None,
    strata: int = 0,
    ode_images: int = 0,
    ode_steps: int = 64,
    fid: bool = False,
    fid_reference=None,
    inception_weights: str | None = None,
    fid_sampler: str | None = None,
    split: str = "test",
) -> dict:
    """Scores the latest checkpoint of workdir; returns (and writes) a flat dict of numbers.

    The bound is the method's most exact one (strata=0: all T terms of a discrete chain) or its
    estimate with `strata` strata. A sampler the method lacks falls back to its default one.
    fid: FID, IS and KID of num_samples samples drawn with fid_sampler (None: the method's default
    sampler, its full chain; a name: that sampler with num_steps and eta) against fid_reference
    (a spec, fid_reference.parse_spec, or a Spec; None: the run's train split), with the Inception weights file
    inception_weights (None: inception_weights.resolve_inception_weights).
    split: "test" (config.data.eval_split) or "validation" (data.splits.load_validation): the bound's and
    the ODE NLL's images.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: use 'test' (the number to report) or 'validation' (for choices).")
    run = load_run(workdir, which=params)
    config, method = run.config, run.method
    if quality and config.data.dataset == "digits":  # the feature network first: trained once, then cached
        from ddpm_jax.evaluation import digits_classifier

        digits_classifier.load_or_train()
    if sampler not in method.samplers:  # the method's own default (VDM: a num_steps chain; VAE: one pass)
        sampler = method.default_sampler()
    if sampler != "ancestral" and num_steps is not None:
        num_steps = min(num_steps, getattr(method, "num_timesteps", num_steps))
    method.check_sampler(sampler, num_steps, eta)
    fid_eval = None
    if fid:  # its arguments checked before anything is compiled
        from ddpm_jax.evaluation import fid as fid_lib

        fid_eval = fid_lib.FidEvaluator(
            config, num_samples, fid_reference, inception_weights, show_progress=distributed.is_main_process()
        )
        if fid_sampler not in method.samplers:  # not given, or one the method lacks: its default, full chain
            fid_sampler = None
        fid_steps = (num_steps, eta) if fid_sampler else (None, 0.0)
        fid_sampler = fid_sampler or method.default_sampler()
        method.check_sampler(fid_sampler, *fid_steps)
    steps = train_lib.compile_steps(method, config, bpd_strata=strata)
    weights = distributed.replicate(run.params)
    out_dir = fileio.as_path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"workdir": workdir, "step": run.step, "params": params, "split": split}
    suffix = "" if split == "test" else f"_{split}"
    rng = jax.random.PRNGKey(seed)
    start = time.time()
    images = None
    if bpd or ode_images:  # the input pipeline only when a split is read
        from ddpm_jax.data import splits

        images = (
            splits.load_split(config, config.data.eval_split) if split == "test" else splits.load_validation(config)
        )
    if bpd:
        batch = bpd_batch_size or config.training.bpd_batch_size or config.training.batch_size
        numbers = report.evaluate_bpd(
            steps.p_bpd, weights, images, config, rng, batch_size=batch, progress=f"{split} bits/dim"
        )
        if "vb_per_t" in numbers:
            plots.plot_vb_terms(
                numbers.pop("vb_per_t"),
                out_dir / f"bpd_terms_{params}{suffix}.png",
                f"{split} bound: {numbers['total_bpd']:.3f} bits/dim",
            )
        result.update(numbers, bpd_time_s=time.time() - start, bpd_method=method.bound_description(strata))
    if ode_images:  # the probability-flow ODE NLL of the split's first ode_images images (evaluation.ode_eval)
        from ddpm_jax.evaluation import ode_eval

        start = time.time()
        result.update(
            ode_eval.ode_nll_over_images(
                method, run.params, images[:ode_images], jax.random.fold_in(rng, 2), num_steps=ode_steps
            )
        )
        result["ode_time_s"] = time.time() - start
    if quality:
        start = time.time()
        samples = sample_lib.draw_samples(
            steps.p_sample,
            weights,
            jax.random.fold_in(rng, 1),
            num_samples if config.data.dataset == "digits" else min(num_samples, 100),  # elsewhere: the grid only
            sampler=sampler,
            num_steps=num_steps,
            eta=eta,
        )["samples"]
        result["samples_png"] = plots.save_grid(samples[:100], out_dir / f"samples_{params}.png")
        result["sampler"] = method.sampler_label(sampler, num_steps)
        result.update(sample_quality(config, samples, seed))
        result["quality_time_s"] = time.time() - start
    if fid_eval is not None:
        numbers = fid_eval(steps.p_sample, weights, jax.random.fold_in(rng, 3), fid_sampler, *fid_steps)
        numbers["fid_sampler"] = method.sampler_label(fid_sampler, fid_steps[0])
        result.update(numbers)
        if distributed.is_main_process():
            write_fid_to_run(workdir, run.step, params, numbers)
    fileio.atomic_write_json(out_dir / f"{params}{suffix}.json", result)
    return result


def write_fid_to_run(workdir: str, step: int, params: str, numbers: dict) -> None:
    """FID, IS and KID into <workdir>/results.json (merged) and the run's metrics (metrics.jsonl and
    TensorBoard) at the checkpoint's step; the raw params' numbers with a _raw suffix."""
    from ddpm_jax.evaluation.fid import FID_SCALARS
    from ddpm_jax.training.metric_writer import MetricWriter, read_metrics

    suffix = "" if params == "ema" else f"_{params}"
    path = fileio.as_path(workdir) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({f"{k}{suffix}": v for k, v in numbers.items() if not k.endswith("_time_s")})
    fileio.atomic_write_json(path, results)
    last = max([int(r.get("step", 0)) for r in read_metrics(workdir)] + [step, 1])  # no record is trimmed
    writer = MetricWriter(workdir, resume_step=last)
    writer.write(step, {f"{k}{suffix}": numbers[k] for k in FID_SCALARS if k in numbers})
    writer.flush()


def sample_quality(config, samples, seed: int = 0) -> dict:
    """The digits-classifier Fréchet distance (fd, not FID), its train-vs-test floor and the classifier
    score (digits only)."""
    if config.data.dataset != "digits":
        return {}
    from ddpm_jax.evaluation import digits_classifier

    return digits_classifier.digits_sample_quality(samples, seed=seed)


def cli_main() -> None:
    """The command line (flags are defined here, not at import, so the library imports cleanly)."""
    _WORKDIR = flags.DEFINE_string("workdir", "runs/default", "A workdir that train.py wrote.")
    _PARAMS = flags.DEFINE_enum(
        "params", "ema", list(WHICH), "Score the EMA or the raw parameters, or the best EMA ones (keep_best)."
    )
    _SPLIT = flags.DEFINE_enum(
        "split",
        "test",
        list(SPLITS),
        "The split of the bound and the ODE NLL: test (the number to report) or validation (for choices).",
    )
    _BPD = flags.DEFINE_bool("bpd", True, "Compute the bound on --split (all T terms).")
    _QUALITY = flags.DEFINE_bool(
        "quality", True, "Draw samples and compute the digits-classifier Fréchet distance (digits only; not FID)."
    )
    _NUM = flags.DEFINE_integer(
        "num_samples",
        500,
        "Samples for the digits-classifier distance and for --fid (the paper: 50000).",
        lower_bound=2,
    )
    _SAMPLER = flags.DEFINE_enum(
        "sampler",
        "respaced",
        list(methods.SAMPLERS),
        f"Sampler for quality; one the method lacks falls back to its first. {methods.sampler_help()}.",
    )
    _STEPS = flags.DEFINE_integer("steps", 100, "Steps of the respaced / DDIM sampler.", lower_bound=1)
    _ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta.")
    _SEED = flags.DEFINE_integer("seed", 0, "Seed of the bound's noise and of the samples.")
    _STRATA = flags.DEFINE_integer(
        "strata", 0, "0: the bound with all T terms; > 0: its stratified estimate.", lower_bound=0
    )

    _ODE = flags.DEFINE_integer(
        "ode_images",
        0,
        "Also the probability-flow ODE NLL of this many images of --split (0: off; VDM, eps-DDPM).",
        lower_bound=0,
    )
    _ODE_STEPS = flags.DEFINE_integer("ode_steps", 64, "RK4 steps of the ODE NLL.", lower_bound=1)
    _FID = flags.DEFINE_bool(
        "fid", False, "FID, Inception Score and KID of --num_samples samples (default sampler unless --sampler)."
    )
    _FID_REF = flags.DEFINE_string(
        "fid_reference",
        None,
        "FID reference: DATASET:SPLIT (e.g. cifar10:train), folder:PATH or a .npz with mu and sigma; "
        "default the run's train split (statistics cached).",
    )
    _INCEPTION = flags.DEFINE_string(
        "inception_weights",
        None,
        "The FID Inception weights (.pth); default $DDPM_JAX_INCEPTION_WEIGHTS, a cached copy, or a download.",
    )

    def main(argv):
        if not fileio.as_path(_WORKDIR.value).is_dir():
            raise ConfigError(f"--workdir={_WORKDIR.value}: no such folder; pass a workdir that train.py wrote.")
        result = evaluate_workdir(
            _WORKDIR.value,
            params=_PARAMS.value,
            bpd=_BPD.value,
            quality=_QUALITY.value,
            num_samples=_NUM.value,
            sampler=_SAMPLER.value,
            num_steps=_STEPS.value,
            eta=_ETA.value,
            seed=_SEED.value,
            strata=_STRATA.value,
            ode_images=_ODE.value,
            ode_steps=_ODE_STEPS.value,
            fid=_FID.value,
            fid_reference=_FID_REF.value,
            inception_weights=_INCEPTION.value,
            fid_sampler=_SAMPLER.value if flags.FLAGS["sampler"].present else None,
            split=_SPLIT.value,
        )
        print(json.dumps(result, indent=2))

    cli.run(main)


if __name__ == "__main__":
    cli_main()
