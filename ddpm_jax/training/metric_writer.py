"""A run's scalars, pictures and config: <workdir>/metrics.jsonl and <workdir>/tensorboard (process 0 only).

Paths go through etils.epath and TensorBoard's writer takes the same URIs, so a workdir may be
local or remote (gs://...).
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from ddpm_jax import configuration, fileio
from ddpm_jax.training import distributed

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVENT_FILES = "events.out.tfevents.*"  # tf.summary's file names


def hparams(config) -> dict:
    """The config as TensorBoard hparams: {"section.field": bool | int | float | str} for every field
    (tuples and None as their Python text, e.g. "(1, 2)" and "None")."""
    out = {}
    for key, value in configuration.flatten(config, prefix="").items():
        if isinstance(value, np.generic):
            value = value.item()
        out[key.removeprefix(".")] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class MetricWriter:
    """Scalars to metrics.jsonl and TensorBoard, sample grids and the config to TensorBoard; only
    process 0 writes.

    On resume the records after the restored step are dropped (they will be written again), and
    a last line cut short by a kill is removed, so metrics.jsonl always reads as one clean run. A
    fresh start (resume_step 0) also drops the TensorBoard event files of an earlier attempt that
    never reached a checkpoint, so the folder holds one run and one hparams session.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = distributed.is_main_process()
        self.path = epath.Path(workdir) / METRICS_FILE
        self.tensorboard_dir = epath.Path(workdir) / TENSORBOARD_DIR
        self.resume_step = int(resume_step)
        self._tb = None
        if self.active:
            import tensorflow as tf

            self._trim()
            if not self.resume_step:
                for events in self.tensorboard_dir.glob(EVENT_FILES):
                    events.unlink()
            self._tb = tf.summary.create_file_writer(str(self.tensorboard_dir))

    def records(self) -> list[dict]:
        """The records of metrics.jsonl, skipping a last line cut short by a kill."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def _trim(self) -> None:
        if not self.path.exists():
            return
        old = self.path.read_text()
        new = "".join(json.dumps(r) + "\n" for r in self.records() if r.get("step", 0) <= self.resume_step)
        if new != old:  # a temporary file, then a rename: a kill leaves the old file or the new one
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_text(new)
            tmp.replace(self.path)

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        if fileio.is_local(self.path):
            with self.path.open("a") as f:
                f.write(line)
        else:  # object stores have no append (gcsfs silently overwrites): rewrite the whole object
            self.path.write_text((self.path.read_text() if self.path.exists() else "") + line)
        import tensorflow as tf

        with self._tb.as_default():
            for k, v in scalars.items():
                tf.summary.scalar(k, float(v), step=int(step))
        self._tb.flush()

    def write_images(self, step: int, images: dict) -> None:
        """Pictures (sample grids from plots.image_grid) to TensorBoard: {tag: uint8 [H, W, C]}, C in
        {1, 3, 4}, stored losslessly as PNG at their own size."""
        if not self.active:
            return
        import tensorflow as tf

        with self._tb.as_default():
            for tag, image in images.items():
                image = np.asarray(image)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
                    raise ValueError(
                        f"image {tag!r}: expected uint8 [H, W, C] with C in 1, 3 or 4 (plots.image_grid's "
                        f"output), got {image.dtype} {image.shape}."
                    )
                tf.summary.image(tag, image[None], step=int(step), max_outputs=1)
        self._tb.flush()

    def write_hparams(self, config) -> None:
        """The config as the run's hparams session (TensorBoard's HParams tab), at a fresh start only:
        a resumed run keeps the session its start wrote, so each run has one (fields a resume may
        change, like num_train_steps, show their first values there; config.json has the latest).

        No hparams_config is written: TensorBoard then builds the table from every run's session
        under --logdir (the union of fields, ablated ones first) with each scalar tag as a metric.
        """
        if not self.active or self.resume_step:
            return
        from tensorboard.plugins.hparams import api as hp

        with self._tb.as_default():
            hp.hparams(hparams(config))
        self._tb.flush()
