"""The standard FID Inception weights: find or download the .pth file, read it without torch, convert.

The file is the one torch-fidelity and pytorch-fid download (`weights-inception-2015-12-05-6726825d.pth`
/ `pt_inception-2015-12-05-6726825d.pth`, the same bytes: 6726825d is the start of its sha256, as
torch.hub names files). It is a torch.save'd state dict; `read_state_dict` reads both of torch.save's
formats with a restricted unpickler that turns tensors into numpy arrays:

- zip (torch >= 1.6): `<prefix>/data.pkl` is a pickle whose tensors are
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and whose storages are
  persistent ids ("storage", StorageType, key, location, numel); the bytes are `<prefix>/data/<key>`.
- legacy: five pickles in a row (magic number, protocol 1001, system info, the object with persistent
  ids ("storage", StorageType, key, location, numel, view), the storage keys), then per key an int64
  element count and the raw bytes.

See torch/serialization.py (_load, _legacy_load) and torch/_utils.py (_rebuild_tensor_v2).
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import io
import os
import pickle
import shutil
import tempfile
import urllib.request
import zipfile

import jax
import numpy as np

from ddpm_jax.errors import FidWeightsError
from ddpm_jax.evaluation import inception

URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name
STANDARD_NAMES = (FILE_NAME, "pt_inception-2015-12-05-6726825d.pth")  # and pytorch-fid's
SHA256_PREFIX = "6726825d"
ENV = "DDPM_JAX_INCEPTION_WEIGHTS"
CACHE_ENV = "DDPM_JAX_CACHE"  # the project's cache folder (as digits_classifier)
FLAG = "--inception_weights"
_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (legacy format)
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
    "UntypedStorage": "u1",
}


# ----------------------------------------------------------------------------- finding the file


def cache_dir() -> str:
    """$DDPM_JAX_CACHE, else $XDG_CACHE_HOME/ddpm_jax, else ~/.cache/ddpm_jax."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "ddpm_jax")


def _torch_hub_dir() -> str:
    """Where torch-fidelity and pytorch-fid keep their download (torch.hub.get_dir()/checkpoints)."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(home, "torch"))), "hub")


def resolve_inception_weights(path: str | None = None, *, download: bool = True) -> str | None:
    """The weights file: `path`, else $DDPM_JAX_INCEPTION_WEIGHTS, else a cached copy (ours or torch
    hub's), else downloaded from torch-fidelity's release into cache_dir() (with download=False: None).

    Raises:
      FidWeightsError: a given path that does not exist, or no file and no download (one line).
    """
    for given, source in ((path, FLAG), (os.environ.get(ENV), f"${ENV}")):
        if given:
            if not os.path.isfile(given):
                raise FidWeightsError(f"{source} {given}: no such file; point it at {FILE_NAME} (from {URL}).")
            return given
    target = os.path.join(cache_dir(), FILE_NAME)
    hub = os.path.join(_torch_hub_dir(), "checkpoints")
    for candidate in (target, *(os.path.join(hub, name) for name in STANDARD_NAMES)):
        if os.path.isfile(candidate):
            return candidate
    if not download:
        return None
    _download(target)
    return target


def _download(target: str) -> None:
    """URL -> a temporary file beside target -> hash check -> atomic rename."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(target), suffix=".part", delete=False) as f:
            tmp = f.name
            with urllib.request.urlopen(URL, timeout=60) as response:
                shutil.copyfileobj(response, f)
        digest = _sha256(tmp)
        if not digest.startswith(SHA256_PREFIX):
            raise ValueError(f"the download's sha256 is {digest[:16]}..., not {SHA256_PREFIX}...")
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException, ValueError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise FidWeightsError(
            f"the FID Inception weights are not at {target} and downloading {URL} failed ({reason}); "
            f"download that file to {target}, or pass {FLAG} PATH, or set {ENV}=PATH."
        ) from None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading a .pth


class _StorageType:
    def __init__(self, name: str):
        self.name, self.code = name, _STORAGE_DTYPES[name]


class _Storage:
    """One storage: its element type and count; `data` (1-D numpy) is filled once its bytes are read."""

    def __init__(self, storage_type: _StorageType, numel: int):
        self.code, self.numel, self.data = storage_type.code, int(numel), None


class _LazyTensor:
    """_rebuild_tensor_v2's arguments; the legacy format reads the bytes after the pickle."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self, path: str) -> np.ndarray:
        root, base = self.storage
        data = root.data
        start = base + self.offset
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, data.dtype)
        last = start + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if start < 0 or min(self.stride, default=0) < 0 or last >= data.shape[0]:
            raise FidWeightsError(
                f"{path}: a tensor reaches outside its storage; the file is damaged, download it again."
            )
        strides = tuple(s * data.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(data[start:], self.size, strides).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    """Rebuilds a state dict (an OrderedDict of tensors) and nothing else: any other global is refused."""

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, path: str, storages: dict):
        super().__init__(file)
        self.path, self.storages = path, storages

    def find_class(self, module, name):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise FidWeightsError(
            f"{self.path} holds a pickled {module}.{name}, which a state dict of tensors does not; "
            f"it is not an Inception weights file (expected {FILE_NAME})."
        )

    def persistent_load(self, pid):
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage" or not isinstance(pid[1], _StorageType):
            raise FidWeightsError(f"{self.path}: unknown stored object {kind!r}; not a torch.save'd state dict.")
        storage_type, key, _location, numel = pid[1:5]
        key = key.decode() if isinstance(key, bytes) else str(key)
        root = self.storages.setdefault(key, _Storage(storage_type, numel))
        view = pid[5] if len(pid) > 5 else None  # legacy format: (view_key, offset, view_size)
        return (root, 0 if view is None else int(view[1]))


def _fill(storage: _Storage, raw: bytes, endian: str, path: str) -> None:
    dtype = np.dtype(endian + storage.code if storage.code != "b1" else "?")
    if len(raw) < storage.numel * dtype.itemsize:
        raise FidWeightsError(f"{path} is truncated (a storage is short); download it again.")
    storage.data = np.frombuffer(raw, dtype, count=storage.numel)


def _read_zip(path: str, storages: dict):
    with zipfile.ZipFile(path) as zf:
        pickles = sorted((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), key=len)
        if not pickles:
            raise FidWeightsError(f"{path} is a zip without data.pkl; not a torch.save'd state dict.")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(zf.namelist())
        has_order = prefix + "byteorder" in names  # absent in old files: little-endian
        endian = ">" if has_order and zf.read(prefix + "byteorder") == b"big" else "<"
        result = _Unpickler(io.BytesIO(zf.read(pickles[0])), path, storages).load()
        for key, storage in storages.items():
            if f"{prefix}data/{key}" not in names:
                raise FidWeightsError(f"{path} lacks the storage data/{key}; the file is damaged, download it again.")
            _fill(storage, zf.read(f"{prefix}data/{key}"), endian, path)
    return result


def _read_legacy(path: str, storages: dict):
    with open(path, "rb") as f:
        load = lambda: _Unpickler(f, path, storages).load()  # noqa: E731
        if load() != _MAGIC:
            raise FidWeightsError(f"{path} is not a torch.save file (bad magic number); download {URL} again.")
        load()  # protocol version
        sys_info = load()
        endian = "<" if sys_info.get("little_endian", True) else ">"
        result = load()
        for key in load():
            numel = int(np.frombuffer(f.read(8), endian + "i8")[0])
            storage = storages[str(key)]
            _fill(
                storage, f.read(numel * np.dtype(storage.code if storage.code != "b1" else "?").itemsize), endian, path
            )
    return result


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch.save'd state dict (zip or legacy format) as {name: numpy array}, without importing torch."""
    storages: dict[str, _Storage] = {}
    try:
        result = _read_zip(path, storages) if zipfile.is_zipfile(path) else _read_legacy(path, storages)
    except FidWeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle or zip raises many types; all mean the same
        raise FidWeightsError(
            f"{path} cannot be read as a torch.save file ({type(e).__name__}: {e}); download {URL} again."
        ) from None
    if not isinstance(result, dict) or not all(isinstance(v, _LazyTensor) for v in result.values()):
        raise FidWeightsError(f"{path} does not hold a state dict of tensors; expected {FILE_NAME}.")
    return {k: v.materialize(path) for k, v in result.items()}


# ----------------------------------------------------------------------------- converting


def _expected() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """{torch state-dict key: (our collection, our path, torch shape)} from the Flax module's variables."""
    renames = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(inception.init_shapes())[0]:
        names = tuple(k.key for k in keypath)
        shape = leaf.shape
        if names[-1] == "kernel":  # conv HWIO -> OIHW; dense [in, out] -> [out, in]
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        out[".".join((*names[1:-1], renames[names[-1]]))] = (names[0], names[1:], shape)
    return out


def params_from_state_dict(state_dict: dict[str, np.ndarray], source: str = "the state dict") -> dict:
    """torch-fidelity's FeatureExtractorInceptionV3 state dict -> our variables {"params", "batch_stats"}.

    Raises:
      FidWeightsError: a key missing, unexpected or of the wrong shape (named in the message).
    """
    expected = _expected()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not k.endswith(".num_batches_tracked")]
    shapes = [(k, state_dict[k].shape, expected[k][2]) for k in expected if k in state_dict]
    wrong = [f"{k} is {tuple(s)}, expected {e}" for k, s, e in shapes if tuple(s) != e]
    for problem, items in (("lacks", missing), ("has unexpected keys", unexpected), ("has mis-shaped", wrong)):
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            raise FidWeightsError(
                f"{source} {problem} {', '.join(items[:3])}{more}: it is not the FID Inception-V3 state dict "
                f"({FILE_NAME}, {URL})."
            )
    variables: dict = {}
    for key, (collection, path, _) in expected.items():
        value = np.asarray(state_dict[key], np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return variables


def check_hash(path: str) -> None:
    """For a file under a standard name, its sha256 must start with the name's 6726825d (torch.hub's check)."""
    if os.path.basename(path) not in STANDARD_NAMES:
        return
    digest = _sha256(path)
    if not digest.startswith(SHA256_PREFIX):
        raise FidWeightsError(
            f"{path}: sha256 {digest[:16]}... does not start with {SHA256_PREFIX} as its name says; the file is "
            f"damaged or not the standard one: delete it and download {URL} again."
        )


def load_inception_params(path: str | None = None) -> dict:
    """The FID Inception-V3 variables for inception.inception_features, from the standard .pth file.

    Args:
      path: the .pth file; None: resolve_inception_weights() (env var, caches, download).

    Returns:
      {"params": ..., "batch_stats": ...} of float32 numpy arrays.

    Raises:
      FidWeightsError: no file, a hash mismatch under a standard name, or a file that is not this
        network's state dict.
    """
    path = resolve_inception_weights(path)
    check_hash(path)
    return params_from_state_dict(read_state_dict(path), source=path)
