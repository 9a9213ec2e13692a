"""TensorBoard's own event reader, on its TensorFlow stub (nothing here needs TensorFlow): what its
server shows of a folder of event files, and each file's records with their checksums verified."""

import sys
import types

# tensorboard.compat picks its TensorFlow stub when this module exists (//tensorboard/compat:no_tensorflow)
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.backend.event_processing import plugin_event_accumulator  # noqa: E402
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow  # noqa: E402
from tensorboard.plugins.hparams import metadata as hparams_metadata  # noqa: E402

SESSION_TAG = hparams_metadata.SESSION_START_INFO_TAG


def accumulate(logdir: str) -> plugin_event_accumulator.EventAccumulator:
    """The run in logdir as TensorBoard's server loads it (legacy summaries migrated to tensors, a
    restart mark's purge applied), every record kept."""
    acc = plugin_event_accumulator.EventAccumulator(logdir, size_guidance={plugin_event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def records(path: str) -> list:
    """The Events of one file, read to its end; DataLossError on a bad length or data checksum."""
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    out = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return out
        out.append(event_pb2.Event.FromString(reader.record()))
