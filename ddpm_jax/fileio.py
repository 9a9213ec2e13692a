"""Paths of a workdir, local or remote (gs://...), and writes that a kill cannot leave half done.

Every read and write under a workdir goes through etils.epath, so a --workdir may be a local folder
or a URI that epath knows (gs://, s3://, ...). Local paths are made absolute; URIs are kept as given.

Atomic writes: locally a temporary file in the same folder, then os.replace. On an object store a
single upload of the whole object is atomic (readers see the old object or the new one, never a part),
so a remote file is written in one piece, with no temporary object and no rename (object stores have
no atomic rename).
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
from etils import epath


def is_local(path) -> bool:
    """True for a path on a local (or mounted) filesystem, False for a URI such as gs://bucket/run."""
    return "://" not in os.fspath(path)


def as_path(path) -> epath.Path:
    """path as an epath.Path: local paths made absolute, URIs unchanged."""
    return epath.Path(os.path.abspath(path)) if is_local(path) else epath.Path(path)


def display(path) -> str:
    """The path as messages show it (absolute if local)."""
    return os.fspath(as_path(path))


def atomic_write(path, data: str | bytes) -> str:
    """Writes `data` to `path` atomically (readers see the old file or the new one); returns path."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(path):  # one upload of the whole object: atomic on object stores
        target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
        return os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.fspath(path)


def atomic_write_json(path, obj, **kwargs) -> str:
    return atomic_write(path, json.dumps(obj, indent=2, **kwargs))


def save_npz(path, **arrays) -> str:
    """np.savez to any path (built in memory, then one atomic write); returns path."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue())


def load_npz(path) -> dict:
    with as_path(path).open("rb") as f:
        with np.load(io.BytesIO(f.read())) as npz:
            return dict(npz)


def read_text(path) -> str | None:
    """The file's text, or None if it does not exist."""
    p = as_path(path)
    return p.read_text() if p.exists() else None


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file, skipping a last line cut short by a kill."""
    text = read_text(path)
    records = []
    for line in (text or "").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
