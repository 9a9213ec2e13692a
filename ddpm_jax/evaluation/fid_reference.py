"""FID reference statistics: a dataset's Inception pool-feature mean and covariance, computed once and cached.

A reference is named by a spec, one of:
  - "<dataset>:<split>", a dataset the data pipeline knows and one of its splits (cifar10:train, digits:test,
    mnist:train[:10%]), read with ddpm_jax.data's load_images at the run's image size;
  - "folder:PATH", every PNG/JPEG file under PATH (recursively, sorted), read as they are (converted to RGB,
    no resize, as torch-fidelity reads a folder; all must have one size);
  - a path to an .npz file with "mu" [D] and "sigma" [D, D] (the format pytorch-fid, torch-fidelity and the
    TTUR statistics files use), e.g. downloaded statistics of CIFAR-10's training set.

Statistics are written in that same .npz format, so they can be passed back as the third form or to other
tools. Beside "mu" and "sigma" they hold "kid_features", the pool features of up to KID_POOL images chosen
at random (seed KID_POOL_SEED), which KID needs (an .npz without them gives FID without KID), and
"num_images". Computed statistics are cached in <cache>/fid_reference/ (cache: $DDPM_JAX_CACHE, else
~/.cache/ddpm_jax, `cache_dir`), one file per (spec, image size, channels, Inception weights' hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ddpm_jax import fileio
from ddpm_jax.errors import ConfigError, DataError
from ddpm_jax.evaluation.fid_metrics import RunningMoments

CACHE_SUBDIR = "fid_reference"
CACHE_VERSION = 1  # bump when what is stored changes: old cache files are then ignored
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
KID_POOL = 10_000  # reference features kept for KID (torch-fidelity draws its 1000-image subsets from all)
KID_POOL_SEED = 0
BATCH = 500  # images read at a time when computing statistics
SPEC_FORMS = (
    "'<dataset>:<split>' (a dataset the data pipeline knows, e.g. cifar10:train), 'folder:PATH' (a folder of "
    "PNG/JPEG images) or the path of an .npz with 'mu' and 'sigma' (pytorch-fid / torch-fidelity / TTUR format)"
)

# Image batches (uint8 [B, H, W, C]) -> their features' batches, in order ({"pool": [b, D], ...}), e.g.
# functools.partial(inception.stream_features, params).
FeaturesOf = Callable[[Iterable[np.ndarray]], Iterable[dict]]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed reference spec: kind "dataset" (dataset, split), "folder" (path) or "npz" (path)."""

    kind: str
    dataset: str | None = None
    split: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "dataset":
            return f"{self.dataset}:{self.split}"
        return f"{FOLDER_PREFIX}{self.path}" if self.kind == "folder" else self.path


@dataclasses.dataclass
class Statistics:
    """Reference statistics: mu [D], sigma [D, D] (float64), kid_features [K, D] or None, num_images."""

    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray | None = None
    num_images: int | None = None
    source: str = ""


def parse_spec(spec: str) -> Spec:
    """The Spec of a --fid_reference value (the module docstring's three forms).

    Raises:
      ConfigError: a spec of none of the three forms (the message names them).
    """
    spec = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--fid_reference={spec!r}: pass {SPEC_FORMS}.")
    if spec.startswith(FOLDER_PREFIX):
        path = spec[len(FOLDER_PREFIX) :]
        if not path:
            raise ConfigError(f"--fid_reference={spec}: the folder is missing; pass {SPEC_FORMS}.")
        return Spec("folder", path=path)
    if spec.lower().endswith(".npz"):
        return Spec("npz", path=spec)
    dataset, sep, split = spec.partition(":")
    if not sep or not dataset or not split or not re.fullmatch(r"[\w./-]+", dataset):
        raise ConfigError(f"--fid_reference={spec}: not a reference; pass {SPEC_FORMS}.")
    return Spec("dataset", dataset=dataset, split=split)


# ----------------------------------------------------------------------------- the .npz format


def save_statistics(path, stats: Statistics) -> str:
    """Writes stats as an .npz with "mu" and "sigma" (the standard keys) and the extras; returns path."""
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
    if stats.kid_features is not None:
        arrays["kid_features"] = np.asarray(stats.kid_features, np.float32)
    if stats.num_images is not None:
        arrays["num_images"] = np.int64(stats.num_images)
    return fileio.save_npz(path, **arrays)


def load_statistics(path) -> Statistics:
    """Statistics from an .npz with "mu" [D] and "sigma" [D, D] (and, if present, our extras).

    Raises:
      DataError: the file is missing, unreadable, or lacks "mu" / "sigma" of matching shapes.
    """
    if not fileio.as_path(path).exists():
        raise DataError(f"--fid_reference={path}: no such file; pass {SPEC_FORMS}.")
    try:
        arrays = fileio.load_npz(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"--fid_reference={path}: not a readable .npz ({type(e).__name__}: {e}).") from None
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        found = {k: v.shape for k, v in arrays.items()}
        raise DataError(
            f"--fid_reference={path}: expected 'mu' [D] and 'sigma' [D, D] (pytorch-fid / torch-fidelity / TTUR "
            f"statistics), found {found}."
        )
    num = arrays.get("num_images")
    return Statistics(
        mu=mu.astype(np.float64),
        sigma=sigma.astype(np.float64),
        kid_features=arrays.get("kid_features"),
        num_images=None if num is None else int(num),
        source=os.fspath(path),
    )


# ----------------------------------------------------------------------------- images


def _folder_files(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DataError(f"--fid_reference={FOLDER_PREFIX}{root}: no such folder; pass {SPEC_FORMS}.")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"--fid_reference={FOLDER_PREFIX}{root}: no {'/'.join(IMAGE_EXTENSIONS)} files under it.")
    return sorted(files)


def _read_files(paths: list[str], shape: tuple | None) -> np.ndarray:
    """The files as uint8 RGB [n, H, W, 3], all of one shape (`shape` if given: the earlier batches')."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB"), np.uint8))
        if images[-1].shape != (shape or images[0].shape):
            raise DataError(
                f"--fid_reference: the folder's images have several sizes ({path} is {images[-1].shape}, others "
                f"{shape or images[0].shape}); resize them to one size first (the samples'), or use a "
                "'<dataset>:<split>' reference."
            )
    return np.stack(images)


class _Images:
    """A reference's images, read batch by batch: len() and batches(size) -> uint8 [B, H, W, C]."""

    def __init__(self, spec: Spec, data_dir: str | None, image_size: int | None, channels: int | None):
        self.spec = spec
        if spec.kind == "folder":
            self.files = _folder_files(spec.path)
            self.count = len(self.files)
        else:
            from ddpm_jax.data import pipeline  # the input pipeline only when a split is read

            try:  # the whole split on every process: each computes (or reads the cache of) the same statistics
                self.images = pipeline.load_images(
                    spec.dataset,
                    spec.split,
                    data_dir,
                    process_index=0,
                    process_count=1,
                    image_size=image_size,
                    channels=channels,
                )
            except (ValueError, RuntimeError) as e:
                raise DataError(f"--fid_reference={spec}: {e}") from e
            self.count = len(self.images)

    def __len__(self) -> int:
        return self.count

    def batches(self, size: int) -> Iterator[np.ndarray]:
        shape = None
        for start in range(0, self.count, size):
            if self.spec.kind == "folder":
                batch = _read_files(self.files[start : start + size], shape)
                shape = batch.shape[1:]
                yield batch
            else:
                yield np.asarray(self.images[start : start + size], np.uint8)

    def identity(self) -> dict:
        """What the cache key knows of the images beyond the spec: a folder's files, sizes and times."""
        if self.spec.kind != "folder":
            return {}
        digest = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            digest.update(f"{os.path.relpath(f, self.spec.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"files": digest.hexdigest()}


# ----------------------------------------------------------------------------- statistics


def compute_statistics(
    features: Iterable[dict],
    num_images: int,
    kid_pool: int = KID_POOL,
    seed: int = KID_POOL_SEED,
    progress: Callable[[int], None] | None = None,
) -> Statistics:
    """mu and sigma of the pool features of `num_images` images, streamed batch by batch (RunningMoments),
    and the features of min(kid_pool, N) of them drawn at random without replacement (sorted).

    Args:
      features: the images' feature batches in order, {"pool": [b, D], ...} each.
      num_images: how many images they cover (to draw the kept ones up front).
      progress: called with each batch's size.
    """
    keep = np.sort(np.random.RandomState(seed).choice(num_images, min(kid_pool, num_images), replace=False))
    moments, kept, seen = None, [], 0
    for batch in features:
        pool = np.asarray(batch["pool"])
        if moments is None:
            moments = RunningMoments(pool.shape[1])
        moments.update(pool)
        index = keep[(keep >= seen) & (keep < seen + len(pool))] - seen
        kept.append(pool[index].astype(np.float32))
        seen += len(pool)
        if progress is not None:
            progress(len(pool))
    if seen != num_images or moments is None:
        raise DataError(f"reference statistics: expected {num_images} images, read {seen}.")
    mu, sigma = moments.statistics()
    return Statistics(mu, sigma, np.concatenate(kept), num_images)


def cache_dir(root: str | None = None) -> str:
    """<root>/fid_reference, root defaulting to the Inception weights' cache folder (inception_weights.cache_dir:
    $DDPM_JAX_CACHE, else $XDG_CACHE_HOME/ddpm_jax, else ~/.cache/ddpm_jax)."""
    if root is None:
        from ddpm_jax.evaluation import inception_weights

        root = inception_weights.cache_dir()
    return os.path.join(os.path.abspath(os.path.expanduser(root)), CACHE_SUBDIR)


def cache_path(spec: Spec, weights_id: str, image_size, channels, root: str | None = None, identity=None) -> str:
    """The cache file of a dataset or folder reference: its name says what it is, its hash the rest."""
    key = {
        "spec": str(spec),
        "image_size": image_size,
        "channels": channels,
        "weights": weights_id,
        "kid_pool": KID_POOL,
        "version": CACHE_VERSION,
        **(identity or {}),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]+", "_", f"{spec.dataset}_{spec.split}" if spec.kind == "dataset" else spec.path)
    size = f"{image_size}px" if image_size else "stored"
    return os.path.join(cache_dir(root), f"{slug.strip('_')[-60:]}_{size}_{digest}.npz")


def reference_statistics(
    spec: str | Spec,
    features_of: FeaturesOf,
    weights_id: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    cache_root: str | None = None,
    batch_size: int = BATCH,
    progress_factory: Callable[[int, str], object] | None = None,
) -> Statistics:
    """The statistics of a reference: read from an .npz, from the cache, or computed and cached.

    Args:
      spec: a spec string (parse_spec) or a Spec.
      features_of: image batches -> their feature batches (FeaturesOf).
      weights_id: a hash of the Inception weights, part of the cache key.
      data_dir, image_size, channels: how a dataset's split is read (load_images); image_size None keeps the
        stored size. A folder's images are read as they are.
      cache_root: the cache's root (default: `cache_dir`'s); "" caches nothing.
      progress_factory: (total, description) -> an object with update(n) and close(), e.g. progress.Progress.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "npz":
        return load_statistics(spec.path)
    images = _Images(spec, data_dir, image_size, channels)
    path = None
    if cache_root != "":
        fitted = (image_size, channels) if spec.kind == "dataset" else (None, None)  # a folder is read as it is
        path = cache_path(spec, weights_id, *fitted, cache_root, images.identity())
        if os.path.exists(path):
            try:
                stats = load_statistics(path)
                stats.source = f"{spec} (cached in {path})"
                return stats
            except DataError as e:
                logging.warning("Ignoring the damaged FID reference cache %s (%s); recomputing.", path, e)
    bar = progress_factory(len(images), f"FID reference {spec}") if progress_factory else None
    try:
        stats = compute_statistics(
            features_of(images.batches(batch_size)), len(images), progress=bar.update if bar else None
        )
    finally:
        if bar is not None:
            bar.close()
    stats.source = str(spec)
    if path is not None:
        save_statistics(path, stats)
        stats.source = f"{spec} (cached in {path})"
    return stats
