"""TensorBoard event records without TensorFlow: scalars, PNG images, an hparams session, a start mark.

The protocol buffers and the TFRecord framing are tensorboardX's (protobuf only, no TensorFlow;
https://github.com/lanpa/tensorboardX). Each function returns one framed record, ready to be
appended to an events.out.tfevents.* file; where those bytes go (a local append, or one object per
flush on an object store) is metric_writer's choice, since tensorboardX's own gs:// writer uploads
the whole file again at every flush.

TFRecord framing (tensorflow/core/lib/io/record_writer.cc): uint64 length, uint32 masked CRC-32C of
the length, the data, uint32 masked CRC-32C of the data, all little-endian.
"""

from __future__ import annotations

import io
import struct
import sys
import time

import numpy as np
from PIL import Image


def _import_tensorboardx():
    """tensorboardX's package __init__ imports its SummaryWriter, which imports torch where it is installed
    (2 s, and torch's CUDA libraries beside JAX's); only protos, summaries and the checksum are used here,
    so torch is hidden while tensorboardX loads."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX goes on without it
    try:
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import masked_crc32c
    finally:
        if hidden:
            del sys.modules["torch"]
    return summary, event_pb2, summary_pb2, masked_crc32c


tbx_summary, event_pb2, summary_pb2, masked_crc32c = _import_tensorboardx()

FILE_VERSION = "brain.Event:2"  # what TensorFlow's writers put first in every event file


def frame(data: bytes) -> bytes:
    """One TFRecord: the data between its length and their checksums."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _event(step: int = 0, **fields) -> bytes:
    return frame(event_pb2.Event(wall_time=time.time(), step=int(step), **fields).SerializeToString())


def file_version() -> bytes:
    """The record every event file starts with."""
    return _event(file_version=FILE_VERSION)


def scalars(step: int, values: dict) -> bytes:
    """Scalars as simple values (TensorBoard's Scalars tab), one record for all of them."""
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
    )
    return _event(step, summary=summary)


def image(step: int, tag: str, pixels: np.ndarray) -> bytes:
    """uint8 [H, W, C], C in {1, 3, 4}, as a lossless PNG at its own size (TensorBoard's Images tab).
    tensorboardX's `summary.image` would turn one channel into three and resample: this encodes it as given."""
    height, width, channels = pixels.shape
    png = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(png, format="PNG")
    encoded = summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue()
    )
    return _event(step, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=encoded)]))


def hparams_session(values: dict) -> bytes:
    """The hparams plugin's session start info for {name: bool | int | float | str}. No experiment
    summary: TensorBoard then builds the HParams table from every run's session under --logdir."""
    _, session_start, _ = tbx_summary.hparams(values, {})
    return _event(0, summary=session_start)


def session_start(step: int) -> bytes:
    """A SessionLog START at `step`, written at every start of a run. TensorBoard takes the first
    one it meets as the start and each later one as a restart: it drops the events it has read at
    steps >= step, so a run resumed from step - 1 shows each step once (tensorboard's
    plugin_event_accumulator, `_CheckForRestartAndMaybePurge`)."""
    return _event(step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
