"""Orbax checkpoints of the whole train state (step, params, EMA, optimizer, key, loss history).

Orbax writes each step into a temporary folder and renames it when complete, so a kill in
the middle of a save leaves the previous checkpoint as the latest good one. The data stream is
a pure function of (seed, step), so the step is the data position.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the model."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, state, *, force: bool = False) -> bool:
    """Saves an unreplicated state at its step (asynchronously; see `wait`)."""
    return mngr.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state), force=force)


def _shape_mismatches(stored, target) -> list[str]:
    """Paths whose stored shape differs from the target's, for a readable error."""
    out = []
    stored_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        key = jax.tree_util.keystr(path)
        have = getattr(stored_flat.get(key), "shape", None)
        if key not in stored_flat:
            out.append(f"{key}: missing from the checkpoint")
        elif have is not None and tuple(have) != tuple(np.shape(leaf)):
            out.append(f"{key}: checkpoint {tuple(have)} vs model {tuple(np.shape(leaf))}")
    return out


def restore_latest(mngr: ocp.CheckpointManager, target):
    """Restores the newest checkpoint into the structure of `target`; None if there is none.

    Raises:
      CheckpointError: the checkpoint is damaged or was made for another model / image size.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    where = os.path.join(str(mngr.directory), str(step))
    try:
        stored = mngr.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable folders
        raise CheckpointError(f"the checkpoint {where} cannot be read ({type(e).__name__}: {e}). Delete that "
                              f"step's folder to resume from an older one, or use a new --workdir.") from e
    mismatches = _shape_mismatches(stored, target) if stored is not None else []
    if mismatches:
        raise CheckpointError(
            f"the checkpoint {where} was made for another model or image size: {'; '.join(mismatches[:3])}. "
            "Train into a new --workdir, or use the config the checkpoint was trained with.")
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"the checkpoint {where} is damaged ({type(e).__name__}: {e}). Delete that "
                              f"step's folder to resume from an older one, or use a new --workdir.") from e


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))  # atomic


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no training run in {workdir!r} ({CONFIG_FILE} is missing): pass the --workdir "
                              "that train.py wrote to.")
    with open(path) as f:
        return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(tree):
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    return tuple(tree) if isinstance(tree, list) else tree
