"""Sample metrics: FID, Inception Score and KID (`ddpm_jax.fid`, DESIGN.md "Sample metrics").

    from ddpm_jax import fid
    params = fid.load_inception_params("pt_inception-2015-12-05-6726825d.pth")
    feats = fid.inception_features(params, images_uint8)      # {"pool": [N, 2048], "logits": [N, 1008], ...}
    fid.frechet_distance(mu1, sigma1, mu2, sigma2)             # torch-fidelity 0.4.0's definitions
    fid.inception_score(feats["logits_unbiased"])             # (mean, std)
    fid.kernel_inception_distance(feats["pool"], other_pool)  # (mean, std)

And the streaming evaluation behind `ddpm-evaluate --fid` and training.fid_every: samples drawn batch by
batch (`sample_batches`), their features accumulated (`SampleAccumulator`: the pool features' moments,
the IS sums and the first KID_POOL features) and scored against a reference's statistics
(fid_reference), so 50,000 samples are never held at once (`score_batches`).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from ddpm_jax.core import pixels
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import fid_reference
from ddpm_jax.evaluation.fid_metrics import (  # noqa: F401 - the public names
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    InceptionScoreAccumulator,
    RunningMoments,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from ddpm_jax.evaluation.fid_reference import parse_spec, reference_statistics  # noqa: F401
from ddpm_jax.evaluation.inception import inception_features, stream_features  # noqa: F401
from ddpm_jax.evaluation.inception_weights import load_inception_params, resolve_inception_weights  # noqa: F401

KID_POOL = fid_reference.KID_POOL  # sample features kept for KID (the first ones: samples are i.i.d.)
IS_SPLITS = 10  # torch-fidelity's isc_splits
SAMPLE_BATCH = 500  # samples drawn per call of the sample step (all devices together)


def params_digest(params) -> str:
    """A short hash of the Inception variables (part of the reference cache's key)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()[:16]


class SampleAccumulator:
    """The samples' side of FID, IS and KID, fed feature batches in order (`update`), scored by `metrics`."""

    def __init__(self, num: int, kid_pool: int = KID_POOL, is_splits: int = IS_SPLITS):
        self.num, self.kid_pool = num, kid_pool
        self.moments = None
        self.splits = min(is_splits, num)
        self.inception = InceptionScoreAccumulator(num, self.splits)
        self.kept: list[np.ndarray] = []
        self.seen = 0

    def update(self, features: dict) -> None:
        pool = np.asarray(features["pool"])
        if self.moments is None:
            self.moments = RunningMoments(pool.shape[1])
        self.moments.update(pool)
        self.inception.update(features["logits_unbiased"])  # torch-fidelity's IS layer: no fc bias
        if self.seen < self.kid_pool:
            self.kept.append(pool[: self.kid_pool - self.seen].astype(np.float32))
        self.seen += len(pool)

    def metrics(self, reference: fid_reference.Statistics, kid_subset_size: int = KID_SUBSET_SIZE) -> dict:
        """{"fid", "inception_score", "inception_score_std", "kid", "kid_std", ...}; KID only where the
        reference has features (fid_reference's caches do; a bare mu/sigma .npz does not)."""
        mu, sigma = self.moments.statistics()
        if mu.shape != reference.mu.shape:
            raise ConfigError(
                f"FID reference {reference.source}: its features have {reference.mu.shape[0]} dimensions, the "
                f"samples' {mu.shape[0]}; pass statistics of the 2048-d Inception pool features."
            )
        is_mean, is_std = self.inception.result()
        out = {
            "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
            "inception_score": is_mean,
            "inception_score_std": is_std,
            "inception_score_splits": self.splits,
            "fid_num_samples": self.seen,
        }
        if reference.kid_features is not None:
            ours = np.concatenate(self.kept)
            size = min(kid_subset_size, len(ours), len(reference.kid_features))
            if size >= 2:
                kid, kid_std = kernel_inception_distance(ours, reference.kid_features, subset_size=size)
                out.update(kid=kid, kid_std=kid_std, kid_subset_size=size)
        return out


class _Progress:
    """Images done out of `total`: tqdm's bar on a terminal, else a line at every tenth (training.progress)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        from ddpm_jax.training import progress

        self.total, self.desc, self.enabled, self.done, self.start = total, desc, enabled, 0, time.time()
        self.bar = progress.Progress(total, desc=desc, unit="image", enabled=enabled)
        self.next_line = total / 10

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if not self.bar.terminal and self.enabled and self.done >= min(self.next_line, self.total):
            rate = self.done / max(time.time() - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} images ({rate:.1f}/s)", flush=True)
            while self.next_line <= self.done:
                self.next_line += self.total / 10

    def close(self) -> None:
        self.bar.close()


def sample_batches(
    p_sample,
    weights,
    rng,
    num: int,
    batch_size: int = SAMPLE_BATCH,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
) -> Iterator[np.ndarray]:
    """`num` samples as uint8 [b, H, W, C] batches of batch_size (the last trimmed); batch k is drawn with
    key fold_in(rng, k). Every batch has the same shape, so the sample step compiles once."""
    from ddpm_jax.evaluation import sample_lib

    batch_size = min(batch_size, num)
    for k, start in enumerate(range(0, num, batch_size)):
        out = sample_lib.draw_samples(
            p_sample, weights, jax.random.fold_in(rng, k), batch_size, sampler=sampler, num_steps=num_steps, eta=eta
        )
        yield pixels.unscale_images(out["samples"][: num - start])


def features_of(params, per_device_batch: int | None = None):
    """batches -> their Inception features' batches (inception.stream_features), per_device_batch by
    default sized to the first batch (at most inception.DEFAULT_PER_DEVICE_BATCH), so that a small
    stream is not padded to a large batch."""
    from ddpm_jax.evaluation import inception

    def run(batches: Iterable[np.ndarray]) -> Iterator[dict]:
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        per_device = per_device_batch or max(
            1, min(inception.DEFAULT_PER_DEVICE_BATCH, -(-len(first) // jax.local_device_count()))
        )
        yield from stream_features(params, itertools.chain([first], batches), per_device)

    return run


def score_batches(
    params,
    batches: Iterable[np.ndarray],
    num: int,
    reference: fid_reference.Statistics,
    *,
    per_device_batch: int | None = None,
    kid_subset_size: int = KID_SUBSET_SIZE,
    desc: str = "FID samples",
    show_progress: bool = True,
) -> dict:
    """FID, IS and KID of `num` images given as uint8 batches against reference statistics (see
    SampleAccumulator.metrics), streamed: batches -> Inception features -> accumulators."""
    acc = SampleAccumulator(num)
    bar = _Progress(num, desc, enabled=show_progress)
    try:
        for features in features_of(params, per_device_batch)(batches):
            acc.update(features)
            bar.update(len(features["pool"]))
    finally:
        bar.close()
    if acc.seen != num:
        raise ConfigError(f"FID: expected {num} images, got {acc.seen}.")
    return acc.metrics(reference, kid_subset_size)


def reference_for(
    spec: str | fid_reference.Spec,
    params,
    config=None,
    *,
    per_device_batch: int | None = None,
    cache_root: str | None = None,
    show_progress: bool = True,
) -> fid_reference.Statistics:
    """A reference's statistics for this Inception (cached; fid_reference), a dataset's split read as the
    run's config reads its data (data_dir, image_size, channels)."""
    data = config.data if config is not None else None
    return reference_statistics(
        spec,
        features_of(params, per_device_batch),
        params_digest(params),
        data_dir=data.data_dir if data is not None else None,
        image_size=data.image_size if data is not None else None,
        channels=data.channels if data is not None else None,
        cache_root=cache_root,
        progress_factory=lambda total, desc: _Progress(total, desc, enabled=show_progress),
    )


def split_reference(config, split: str) -> fid_reference.Spec:
    """A split of the run's own dataset (a tfds name or a folder dataset), read as training reads it."""
    return fid_reference.Spec("dataset", dataset=config.data.dataset, split=split)


def default_reference(config) -> fid_reference.Spec:
    """The run's train split: the paper's reference (Ho et al. 2020 score CIFAR-10 samples against its
    training set)."""
    return split_reference(config, config.data.train_split)


def find_inception_weights(path: str | None = None) -> str | None:
    """resolve_inception_weights without its download: the file given (path or the environment), or a
    cached copy, else None."""
    return resolve_inception_weights(path, download=False)


class FidEvaluator:
    """FID, IS and KID of a run's samples: its Inception and the reference statistics are loaded on the
    first call and kept (the training loop's fid_every action, ddpm-evaluate --fid).

    Args:
      config: the run's config (the default reference is its train split, read as training reads it).
      num_samples: samples per evaluation (the paper: 50,000).
      reference: a spec (fid_reference.parse_spec, or a Spec); None: default_reference(config).
      inception_weights: the weights file; None: resolve_inception_weights (environment, caches, download),
        here, so that a missing file fails before anything runs.
      batch_size: samples drawn per sample-step call, all devices together.
      show_progress: progress lines or a bar (process 0 only, by the caller).
    """

    def __init__(
        self,
        config,
        num_samples: int,
        reference: str | fid_reference.Spec | None = None,
        inception_weights: str | None = None,
        batch_size: int = SAMPLE_BATCH,
        show_progress: bool = True,
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ConfigError(f"FID: num_samples must be a whole number >= 2, got {num_samples!r}.")
        self.config, self.num_samples, self.batch_size = config, num_samples, batch_size
        if isinstance(reference, fid_reference.Spec):
            self.spec = reference
        else:
            self.spec = fid_reference.parse_spec(reference) if reference else default_reference(config)
        self.weights_path = resolve_inception_weights(inception_weights)  # a missing file fails here, early
        self.show_progress = show_progress
        self.params = self.reference = None

    def prepare(self) -> fid_reference.Statistics:
        """Loads the Inception and the reference statistics (computed and cached the first time)."""
        if self.params is None:
            self.params = load_inception_params(self.weights_path)
        if self.reference is None:
            self.reference = reference_for(self.spec, self.params, self.config, show_progress=self.show_progress)
        return self.reference

    def __call__(self, p_sample, weights, rng, sampler: str = "ancestral", num_steps=None, eta: float = 0.0) -> dict:
        """{"fid", "inception_score", "inception_score_std", "kid", "kid_std", ...} of num_samples samples
        drawn with p_sample (replicated weights, key rng), and where they came from."""
        reference = self.prepare()
        start = time.time()
        batches = sample_batches(p_sample, weights, rng, self.num_samples, self.batch_size, sampler, num_steps, eta)
        out = score_batches(self.params, batches, self.num_samples, reference, show_progress=self.show_progress)
        return {**out, "fid_reference": reference.source, "fid_time_s": round(time.time() - start, 1)}


FID_SCALARS = ("fid", "inception_score", "inception_score_std", "kid", "kid_std")  # what goes to the metrics


def training_evaluator(config) -> FidEvaluator | None:
    """The training loop's FID action (config.training.fid_every > 0, else None): fid_num_samples samples
    of the method's default sampler against the run's train split, with the Inception weights found
    without a download (a missing file stops the run before its first step, saying where to put it)."""
    every = config.training.get("fid_every", 0)
    if not every:
        return None
    from ddpm_jax.evaluation import inception_weights as iw
    from ddpm_jax.training import distributed

    path = find_inception_weights()
    if path is None:
        raise ConfigError(
            f"config.training.fid_every={every} needs the FID Inception weights: download {iw.URL} and set "
            f"{iw.ENV}=PATH (or put it in {iw.cache_dir()}), or set config.training.fid_every=0."
        )
    return FidEvaluator(
        config, config.training.fid_num_samples, inception_weights=path, show_progress=distributed.is_main_process()
    )


def fid_scalars(evaluator: FidEvaluator, steps, params, rng) -> dict:
    """The metric writer's scalars of one periodic FID (FID_SCALARS) of the replicated params' samples,
    drawn with the method's default sampler (steps: train_lib.CompiledSteps)."""
    numbers = evaluator(steps.p_sample, params, rng, steps.method.default_sampler())
    return {k: numbers[k] for k in FID_SCALARS if k in numbers}
