"""A run's scalars, pictures and config: <workdir>/metrics.jsonl and <workdir>/tensorboard (process 0 only).

Paths go through etils.epath, so a workdir may be local or remote (gs://...). TensorBoard's event
records come from event_file (tensorboardX's protocol buffers: no TensorFlow).

Files only grow, by one of two means:
- a local (or mounted) workdir: real appends, to metrics.jsonl and to one events file per start;
- an object store (no append: an object is written whole): records are buffered and each flush
  uploads new objects, metrics.jsonl.d/<n>.jsonl and a new events file. A flush happens when
  FLUSH_SECS have passed since the last at a write, at `flush()` (the loop's hook before each
  checkpoint: records up to a checkpoint are stored before it is), and when the writer is
  released or the process exits. Each record is uploaded once: linear, not a rewrite of the
  whole file at every log step.
`read_metrics(workdir)` reads both layouts as one list.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import weakref

import numpy as np
from etils import epath

from ddpm_jax import configuration, fileio
from ddpm_jax.training import distributed, event_file

METRICS_FILE = "metrics.jsonl"
METRICS_CHUNKS = "metrics.jsonl.d"  # an object store's metrics: <n>.jsonl, n = 1, 2, ... in order
TENSORBOARD_DIR = "tensorboard"
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard reads the files of a folder in name order
_starts = itertools.count()  # the writers this process has started
FLUSH_SECS = 60.0  # object stores: the longest time records wait in memory between writes


def hparams(config) -> dict:
    """The config as TensorBoard hparams: {"section.field": bool | int | float | str} for every field
    (tuples and None as their Python text, e.g. "(1, 2)" and "None")."""
    out = {}
    for key, value in configuration.flatten(config, prefix="").items():
        if isinstance(value, np.generic):
            value = value.item()
        out[key.removeprefix(".")] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _parse(text: str) -> list[dict]:
    """The records of JSON lines, skipping a line cut short by a kill."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _chunks(workdir) -> list[epath.Path]:
    """metrics.jsonl.d's chunks in write order."""
    folder = fileio.as_path(workdir) / METRICS_CHUNKS
    if not folder.exists():
        return []
    return sorted((p for p in folder.iterdir() if p.name.endswith(".jsonl")), key=lambda p: int(p.name.split(".")[0]))


def read_metrics(workdir) -> list[dict]:
    """A run's metric records, {"step": int, name: float, ...}, in step order: metrics.jsonl (a local
    workdir) and then metrics.jsonl.d's chunks (an object store's), a line cut short by a kill skipped."""
    path = fileio.as_path(workdir) / METRICS_FILE
    records = _parse(path.read_text()) if path.exists() else []
    for chunk in _chunks(workdir):
        records += _parse(chunk.read_text())
    return sorted(records, key=lambda r: r.get("step", 0))  # stable: one step's records keep their order


class _Uploads:
    """An object store's pending records, uploaded as new objects at each flush. Separate from the
    writer so that weakref.finalize can flush it when the writer is released (or at exit)."""

    def __init__(self, workdir: epath.Path, events_prefix: str, next_chunk: int):
        self.workdir, self.events_prefix, self.next_chunk = workdir, events_prefix, next_chunk
        self.lines: list[str] = []
        self.events: list[bytes] = []
        self.files = 0
        self.last = time.time()

    def flush(self) -> None:
        if self.lines:
            folder = self.workdir / METRICS_CHUNKS
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{self.next_chunk:06d}.jsonl").write_text("".join(self.lines))
            self.next_chunk += 1
        if self.events:
            name = f"{self.events_prefix}.{self.files:06d}"  # name order is write order
            (self.workdir / TENSORBOARD_DIR / name).write_bytes(event_file.file_version() + b"".join(self.events))
            self.files += 1
        self.lines, self.events, self.last = [], [], time.time()


class MetricWriter:
    """Scalars to metrics.jsonl and TensorBoard, sample grids and the config to TensorBoard; only
    process 0 writes.

    On resume the records after the restored step are dropped (they will be written again), and
    a last line cut short by a kill is removed, so metrics.jsonl always reads as one clean run;
    TensorBoard gets a start mark that hides the earlier attempt's events after that step. A
    fresh start (resume_step 0) also drops the TensorBoard event files of an earlier attempt that
    never reached a checkpoint, so the folder holds one run and one hparams session.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = distributed.is_main_process()
        self.workdir = fileio.as_path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.tensorboard_dir = self.workdir / TENSORBOARD_DIR
        self.resume_step = int(resume_step)
        self.local = fileio.is_local(workdir)
        self._uploads = None
        if not self.active:
            return
        self._trim()
        if not self.resume_step:
            for events in self.tensorboard_dir.glob(EVENT_FILES):
                events.unlink()
        self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard's name (events.out.tfevents.<time>.<host>), then what keeps the names of one
        # workdir's files distinct and in write order
        prefix = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_starts):04d}"
        if self.local:
            self._events_path = self.tensorboard_dir / f"{prefix}.v2"
            self._append_events(event_file.file_version())
        else:
            chunks = _chunks(self.workdir)
            self._uploads = _Uploads(self.workdir, prefix, int(chunks[-1].name.split(".")[0]) + 1 if chunks else 1)
            weakref.finalize(self, self._uploads.flush)
        self._events(event_file.session_start(self.resume_step + 1))  # a resume's hides the later steps

    def records(self) -> list[dict]:
        """The records written so far (read_metrics, and those waiting for an object store's next flush)."""
        pending = _parse("".join(self._uploads.lines)) if self._uploads else []
        return read_metrics(self.workdir) + pending

    def flush(self) -> None:
        """Stores the buffered records (object stores; a local workdir has none). Called before each
        checkpoint, so that the records up to a checkpoint are never lost to a kill after it."""
        if self._uploads is not None:
            self._uploads.flush()

    def _trim(self) -> None:
        """Drops the records after resume_step: in metrics.jsonl (a temporary file, then a rename, so a kill
        leaves the old file or the new one) and in the chunks, last first (a kill leaves a prefix of them)."""
        keep = lambda records: [r for r in records if r.get("step", 0) <= self.resume_step]
        if self.path.exists():
            old = self.path.read_text()
            new = "".join(json.dumps(r) + "\n" for r in keep(_parse(old)))
            if new != old:
                fileio.atomic_write(self.path, new)
        for chunk in reversed(_chunks(self.workdir)):
            records = _parse(chunk.read_text())
            kept = keep(records)
            if len(kept) == len(records):
                break
            if kept:
                chunk.write_text("".join(json.dumps(r) + "\n" for r in kept))  # one object: atomic
                break
            chunk.unlink()

    def _append_events(self, data: bytes) -> None:
        with self._events_path.open("ab") as f:
            f.write(data)

    def _events(self, data: bytes) -> None:
        if self.local:
            self._append_events(data)
        else:
            self._uploads.events.append(data)

    def _maybe_flush(self) -> None:
        if self._uploads is not None and time.time() - self._uploads.last >= FLUSH_SECS:
            self._uploads.flush()

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        if self.local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._uploads.lines.append(line)
        self._events(event_file.scalars(step, scalars))
        self._maybe_flush()

    def write_images(self, step: int, images: dict) -> None:
        """Pictures (sample grids from plots.image_grid) to TensorBoard: {tag: uint8 [H, W, C]}, C in
        {1, 3, 4}, stored losslessly as PNG at their own size."""
        if not self.active:
            return
        for tag, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"image {tag!r}: expected uint8 [H, W, C] with C in 1, 3 or 4 (plots.image_grid's "
                    f"output), got {image.dtype} {image.shape}."
                )
            self._events(event_file.image(step, tag, image))
        self._maybe_flush()

    def write_hparams(self, config) -> None:
        """The config as the run's hparams session (TensorBoard's HParams tab), at a fresh start only:
        a resumed run keeps the session its start wrote, so each run has one (fields a resume may
        change, like num_train_steps, show their first values there; config.json has the latest).

        No hparams_config is written: TensorBoard then builds the table from every run's session
        under --logdir (the union of fields, ablated ones first) with each scalar tag as a metric.
        """
        if not self.active or self.resume_step:
            return
        self._events(event_file.hparams_session(hparams(config)))
