"""Writes that a kill cannot leave half done: a temporary file in the same folder, then os.replace."""

from __future__ import annotations

import json
import os
import tempfile


def atomic_write(path: str, data: str | bytes) -> str:
    """Writes `data` to `path` atomically (readers see the old file or the new one); returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_json(path: str, obj, **kwargs) -> str:
    return atomic_write(path, json.dumps(obj, indent=2, **kwargs))


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, skipping a last line cut short by a kill."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
