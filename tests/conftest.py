"""Test-session setup, done when pytest imports this file (before any test module imports jax or
tensorflow_datasets):

- 4 forced host (CPU) devices, so pmap tests see several devices;
- the tfds data_dir (TFDS_DATA_DIR; tfds reads it once, when it is imported, so it cannot wait for
  a fixture) and the digits classifier's cache (digits_classifier.CACHE_ENV), which would
  otherwise go to the user's home, point into one temporary folder, removed at the end of the
  session; subprocesses inherit them. XLA's compilation cache stays where xla_flags.configure puts
  it (~/.cache/ddpm_jax/xla by default): it is keyed by the programs, and a warm one is what makes
  a second run of the suite fast.

Fixtures: `data_dir` (that tfds folder, the digits prepared once) and `steps_for(config)` (a
config's compiled steps, built once per session, for loop.train_and_evaluate(steps=...)).
"""

import collections
import os
import shutil
import tempfile

import pytest

from ddpm_jax import xla_flags

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

SESSION_DIR = tempfile.mkdtemp(prefix="ddpm_jax_tests_")
DATA_DIR = os.path.join(SESSION_DIR, "tfds")
CLASSIFIER_CACHE = os.path.join(SESSION_DIR, "classifier")
CLASSIFIER_CACHE_ENV = "DDPM_JAX_CACHE"  # ddpm_jax.evaluation.digits_classifier.CACHE_ENV (checked in session_dirs)
os.makedirs(DATA_DIR)  # a config.data.data_dir must exist
os.environ["TFDS_DATA_DIR"] = DATA_DIR
os.environ[CLASSIFIER_CACHE_ENV] = CLASSIFIER_CACHE

xla_flags.configure()  # the XLA:CPU flags train.py and sample.py run with

# XLA compiles dominate this suite on CPU; skipping most optimisations cuts them several-fold
# (the flax examples' tests do the same). Numerics are unchanged up to float rounding.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


@pytest.fixture(scope="session", autouse=True)
def session_dirs():
    """The session's temporary folder (see the module docstring), as the code under test sees it."""
    from ddpm_jax.evaluation import digits_classifier

    assert digits_classifier.CACHE_ENV == CLASSIFIER_CACHE_ENV
    assert os.environ["TFDS_DATA_DIR"] == DATA_DIR
    return SESSION_DIR


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)  # also after --collect-only or an interrupted session


@pytest.fixture(scope="session")
def data_dir():
    """The session's tfds data_dir (also tfds's default here), with the digits prepared once."""
    from ddpm_jax.data import pipeline

    pipeline.load_images("digits", "train", DATA_DIR)
    return DATA_DIR


STEPS_CACHE_SIZE = 4  # distinct configs whose compiled steps stay in memory (the old loop._build kept 4 too)


@pytest.fixture(scope="session")
def steps_for():
    """steps_for(config) -> train_lib.compile_steps of that config, kept for the last few configs.

    Pass it to loop.train_and_evaluate(config, workdir, steps=steps_for(config)): each call with a
    new set of steps compiles them again (a minute for the runlocal UNet on this CPU).
    """
    from ddpm_jax import methods
    from ddpm_jax.training import train_lib

    cache = collections.OrderedDict()

    def get(config):
        key = config.to_json_best_effort(sort_keys=True)
        if key not in cache:
            cache[key] = train_lib.compile_steps(methods.from_config(config), config)
            while len(cache) > STEPS_CACHE_SIZE:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    return get
