"""The default install has no TensorFlow: train, evaluate and read datasets without it.

TF is installed in the test environment, so each check runs in a subprocess where it cannot be imported: the
import system's path finder is wrapped to find no "tensorflow" or "tensorflow.*" module, which is what a TF-free
install looks like to `import tensorflow` (ModuleNotFoundError) and to importlib.util.find_spec (None; etils and
tfds probe TF that way). A sys.meta_path finder that raised ImportError instead would break those probes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers.fault_utils import ROOT

BLOCK_TF = """
import sys
from importlib.machinery import PathFinder


class _NoTensorFlow(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_NoTensorFlow if f is PathFinder else f for f in sys.meta_path]
"""

LOADED_TF = "sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))"


def _run(code: str, tmp_path, data_dir: str) -> dict:
    """Runs BLOCK_TF + code in a fresh Python (2 CPU devices, the test helpers importable); code prints one
    JSON line last, returned."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "TFDS_DATA_DIR": data_dir,
        "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TF + code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_blocker_hides_tensorflow(tmp_path):
    out = _run(
        "import importlib.util, json\n"
        "try:\n    import tensorflow\n    error = None\nexcept ModuleNotFoundError as e:\n    error = str(e)\n"
        "print(json.dumps({'error': error, 'spec': importlib.util.find_spec('tensorflow') is None}))",
        tmp_path,
        str(tmp_path),
    )
    assert out == {"error": "No module named 'tensorflow'", "spec": True}


@pytest.mark.slow
def test_digits_train_and_evaluate_without_tensorflow(tmp_path):
    """Prepares the digits (as ArrayRecord) into a fresh data_dir, trains 4 steps and scores the bound, with
    TensorFlow unimportable; nothing imported it."""
    data_dir = str(tmp_path / "tfds")
    os.makedirs(data_dir)
    code = f"""
import json
from helpers.fault_utils import micro_config
from ddpm_jax.training import loop
from ddpm_jax.commands.evaluate import evaluate_workdir

config = micro_config({data_dir!r}, **{{"training.num_train_steps": 4, "training.batch_size": 8,
                                       "training.log_every": 2, "data.random_flip": True}})
result = loop.train_and_evaluate(config, "run")
scores = evaluate_workdir("run", bpd=True, quality=False, strata=2, bpd_batch_size=64)
print(json.dumps({{"sha": result["params_sha256"], "scores": sorted(scores), "tf": {LOADED_TF}}}))
"""
    out = _run(code, tmp_path, data_dir)
    assert out["tf"] == []
    assert len(out["sha"]) == 64 and any("bpd" in k for k in out["scores"])
    assert os.path.isdir(os.path.join(data_dir, "digits", "1.1.0"))  # prepared here, without TF


NEEDS_TF_BUILDER = '''
import numpy as np
import tensorflow_datasets as tfds


class NeedsTfPictures(tfds.core.GeneratorBasedBuilder):
    """Yields NumPy images, which tfds encodes to PNG with tf.image.encode_png: preparing it needs TF."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        image = tfds.features.Image(shape=(4, 4, 3))
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"image": image}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(2):
            yield i, {"image": np.zeros((4, 4, 3), np.uint8)}
'''


def test_datasets_that_need_tensorflow_name_the_extra(tmp_path):
    """Without TF, one DataError line naming `pip install 'ddpm_jax[tf]'` for a tfds dataset stored as tfrecord
    (an ArrayRecord dataset whose metadata is changed to say tfrecord: the error comes before any read, so
    writing it needs no TensorFlow either) and for a builder whose preparation needs TF."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    data_dir = tmp_path / "tfds"
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tfrecord_pictures",
        version="1.0.0",
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(4, 4, 3))}),
        split_datasets={"train": [(i, {"image": png.getvalue()}) for i in range(3)]},
        data_dir=str(data_dir),
        file_format="array_record",
    )
    (info_path,) = data_dir.glob("tfrecord_pictures/*/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    (tmp_path / "needs_tf").mkdir()
    (tmp_path / "needs_tf" / "__init__.py").write_text(NEEDS_TF_BUILDER)
    code = f"""
import json
import needs_tf  # registers "needs_tf_pictures"
from ddpm_jax.data import pipeline
from ddpm_jax.errors import DataError

messages = []
for name in ("tfrecord_pictures", "needs_tf_pictures"):
    try:
        pipeline.load_images(name, "train", {str(data_dir)!r}, 0, 1)
        messages.append(None)
    except DataError as e:
        messages.append(str(e))
print(json.dumps({{"messages": messages, "tf": {LOADED_TF}}}))
"""
    out = _run(code, tmp_path, str(data_dir))
    stored, prepare = out["messages"]
    assert out["tf"] == []
    assert "stored as tfrecord" in stored and "pip install 'ddpm_jax[tf]'" in stored
    assert "Preparing tfds dataset 'needs_tf_pictures' needs TensorFlow" in prepare
    assert "pip install 'ddpm_jax[tf]'" in prepare
    assert "\n" not in stored + prepare
