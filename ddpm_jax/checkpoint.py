"""Orbax checkpoints of the whole train state (step, params, EMA, optimizer, key, loss history).

Kill-safety: Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and renames it to
`<step>` once complete (an atomic rename on a local or NFS disk). A folder with the tmp suffix
is never listed as a step, so a kill in the middle of a save leaves the previous checkpoint as
the latest one; the training manager deletes such leftovers when it starts
(`cleanup_tmp_directories`). The data stream is a pure function of (seed, step), so the step is
the data position.

Many processes: every process calls save / restore at the same steps (Orbax synchronises them).
The state is saved as host NumPy arrays, identical on every process; Orbax writes replicated
NumPy arrays from process 0 only and every process reads them back.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.validation import UserError

CONFIG_FILE = "config.json"
# Config sections and fields that fix the shapes or the meaning of a checkpoint; changing them
# between a run and its resume is an error. Everything else (steps, lr, logging) may change.
FROZEN_FIELDS = ("data.image_size", "data.channels", "model", "diffusion")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the model."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, max_to_keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The workdir's CheckpointManager; read_only for readers (sample.py) beside a running training."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep, create=not read_only,
                                           cleanup_tmp_directories=not read_only, read_only=read_only)
    # The handler registered up front lets `item_metadata` read the stored shapes before a restore.
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def save(mngr: ocp.CheckpointManager, state, *, force: bool = False) -> bool:
    """Saves a host copy of an unreplicated state at its step, asynchronously.

    Returns False (and writes nothing) when that step is already saved, e.g. a pre-emption right
    after a periodic save. Call `mngr.wait_until_finished()` before exiting.
    """
    state = jax.device_get(state)
    step = int(state.step)
    if step in mngr.all_steps():
        return False
    return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def _path_key(path) -> str:
    """'params/conv_in/kernel' for a key path, whether its parts are attributes, dict keys or indices."""
    names = (getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return "/".join(str(n) for n in names)


def _shape_mismatches(stored, target) -> list[str]:
    """Paths whose stored shape differs from the target's, for a readable error."""
    out = []
    stored_flat = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        key = _path_key(path)
        have = getattr(stored_flat.get(key), "shape", None)
        if key not in stored_flat:
            out.append(f"{key}: missing from the checkpoint")
        elif have is not None and tuple(have) != tuple(np.shape(leaf)):
            out.append(f"{key}: checkpoint {tuple(have)} vs model {tuple(np.shape(leaf))}")
    return out


def _damaged(where: str, e: Exception, older: list[int]) -> CheckpointError:
    fallback = (f"Delete that folder to resume from the previous checkpoint (step {older[-1]})" if older
                else "Delete that folder to start afresh")
    return CheckpointError(f"the checkpoint {where} is damaged or incomplete and cannot be read "
                           f"({type(e).__name__}: {str(e)[:300]}). {fallback}, or train into a new --workdir.")


def restore_latest(mngr: ocp.CheckpointManager, target):
    """Restores the newest complete checkpoint into the structure of `target`; None if there is none.

    Args:
      mngr: from `make_manager`.
      target: a state of the right structure and shapes (e.g. a freshly initialised one).

    Returns:
      The restored state, with NumPy leaves (the same on every process), or None.

    Raises:
      CheckpointError: the checkpoint is damaged or was made for another model / image size.
    """
    mngr.reload()
    steps = sorted(mngr.all_steps())
    if not steps:
        return None
    step, older = steps[-1], steps[:-1]
    where = os.path.join(str(mngr.directory), str(step))
    try:
        stored = mngr.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable folders
        raise _damaged(where, e, older) from e
    if stored is None:
        raise _damaged(where, FileNotFoundError("no readable metadata"), older)
    target = jax.device_get(target)
    mismatches = _shape_mismatches(stored, target)
    if mismatches:
        raise CheckpointError(
            f"the checkpoint {where} was made for another model or image size: {'; '.join(mismatches[:3])}. "
            "Train into a new --workdir, or use the config the checkpoint was trained with.")
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001
        raise _damaged(where, e, older) from e


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises CheckpointError if `config` changes a field that a run in `workdir` cannot resume with."""
    def flat(tree, prefix):
        if isinstance(tree, (dict, ml_collections.ConfigDict)):
            items = tree.items()
            return {k: v for key, sub in items for k, v in flat(sub, f"{prefix}.{key}").items()}
        return {prefix: tuple(tree) if isinstance(tree, list) else tree}

    diffs = []
    for field in FROZEN_FIELDS:
        try:
            old, new = flat(_get(saved, field), field), flat(_get(config, field), field)
        except KeyError:
            continue
        diffs += [f"config.{k}={old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
                  for k in sorted(set(old) & set(new)) if old[k] != new[k]]  # fields both know
    if diffs:
        raise CheckpointError(
            f"{os.path.abspath(workdir)} holds a run trained with another model or image size: {'; '.join(diffs[:4])}"
            f"{' ...' if len(diffs) > 4 else ''}. Pass the run's values (see {os.path.join(workdir, CONFIG_FILE)}) "
            "to resume it, or train into a new --workdir.")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))  # atomic


def load_config(workdir: str, *, required: bool = True) -> ml_collections.ConfigDict | None:
    """The config a run in workdir was started with; None (or CheckpointError if required) if absent."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        if not required:
            return None
        raise CheckpointError(f"no training run in {workdir!r} ({CONFIG_FILE} is missing): pass the --workdir "
                              "that train.py wrote to.")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}): restore it from a backup, or "
                              "pass the run's config explicitly to train.py, which rewrites it.") from e


def _lists_to_tuples(tree):
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    return tuple(tree) if isinstance(tree, list) else tree
