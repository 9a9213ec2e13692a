"""Scalars of a run to <workdir>/metrics.jsonl and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import os

from ddpm_jax import distributed, fileio


class MetricWriter:
    """Scalars to <workdir>/metrics.jsonl and TensorBoard; only process 0 writes.

    On resume the records after the restored step are dropped (they will be written again), and
    a last line cut short by a kill is removed, so metrics.jsonl always reads as one clean run.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = distributed.is_main_process()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            import tensorflow as tf

            self._trim(resume_step)
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def _trim(self, resume_step: int) -> None:
        if os.path.exists(self.path):
            keep = [r for r in fileio.read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            fileio.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf

        with self._tb.as_default():
            for k, v in scalars.items():
                tf.summary.scalar(k, float(v), step=int(step))
        self._tb.flush()
