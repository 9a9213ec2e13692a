"""Orbax checkpoints of the whole train state (step, params, EMA, optimizer, key, the method's state).

Kill-safety: Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` once complete (an atomic rename on a local or NFS disk). A folder with the tmp suffix
is never listed as a step, so a kill in the middle of a save leaves the previous checkpoint as
the latest one; the training manager deletes such leftovers when it starts
(`cleanup_tmp_directories`). The data stream is a pure function of (seed, step), so the step is
the data position.

Remote workdirs (gs://...): the manager is keyed by an etils.epath.Path, Orbax writes the arrays
through TensorStore's gcs driver and, on GCS, marks a finished step with a commit file instead of
a rename (object stores have no atomic rename); an unfinished step is still never listed. Orbax
needs google-cloud-storage for gs:// (it asks the bucket's layout when it lists steps).

Many processes: every process calls save / restore at the same steps (Orbax synchronises them).
The state is saved as host NumPy arrays, identical on every process; Orbax writes replicated
NumPy arrays from process 0 only and every process reads them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import configuration, fileio
from ddpm_jax.errors import CheckpointError
from ddpm_jax.training import flat_state

CONFIG_FILE = "config.json"
# Train state fields renamed since checkpoints were written, {name in older checkpoints: name now}:
# such checkpoints are still restored (train_lib.TrainState's loss_history became method_state).
RENAMED_FIELDS = {"loss_history": "method_state"}
DEFAULT_ITEM = "default"  # Orbax's name for a manager's single item: <step>/default


def checkpoint_dir(workdir) -> str:
    """<workdir>/checkpoints: absolute for a local workdir, the URI itself for a remote one."""
    return str(checkpoint_path(workdir))


def checkpoint_path(workdir) -> epath.Path:
    return fileio.as_path(workdir) / "checkpoints"


def make_manager(workdir: str, max_to_keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The workdir's CheckpointManager; read_only for readers (sample.py) beside a running training.

    Orbax 0.12's current API: retention is a preservation policy (the newest `max_to_keep` steps;
    n=None, a reader's, keeps all), and the state's handler is registered up front for the default item, so
    `metadata(step)` reads the stored shapes before any restore.
    """
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=None if read_only else max_to_keep),
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(DEFAULT_ITEM, args, ocp.StandardCheckpointHandler)
    return ocp.CheckpointManager(checkpoint_path(workdir), options=options, handler_registry=registry)


def complete_steps(workdir: str) -> list[int]:
    """The steps of the workdir's complete checkpoints, listed without a manager (no collective: safe
    when another process is gone); a step still being written, or left unfinished by a kill, is not one."""
    return sorted(ocp.path.step.checkpoint_steps(checkpoint_path(workdir)))


def save(mngr: ocp.CheckpointManager, state, *, force: bool = False) -> bool:
    """Saves a host copy of an unreplicated state at its step, asynchronously.

    Returns False (and writes nothing) when that step is already saved, e.g. a pre-emption right
    after a periodic save. Call `wait_until_finished(mngr)` before exiting.

    Raises:
      CheckpointError: the disk is full (this save's or the previous one's write failed).
    """
    state = jax.device_get(state)
    if getattr(state, "layout", None) is not None:  # a flat train state (optim.flatten): saved in its tree form
        state = state.to_tree()
    step = int(state.step)
    wait_until_finished(mngr)  # Orbax waits for the previous save anyway; this way its error names its own step
    if step in mngr.all_steps():
        return False
    with _disk_full_as_error(mngr, step):
        return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def wait_until_finished(mngr: ocp.CheckpointManager) -> None:
    """Blocks until the pending asynchronous save is complete; CheckpointError if the disk filled up."""
    with _disk_full_as_error(mngr, mngr.latest_step()):
        mngr.wait_until_finished()


def _is_disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _DiskFullWithoutTraceback(logging.Filter):
    """Orbax logs a failed background save with its traceback before save / wait_until_finished raise it
    again; for a full disk the CheckpointError says it all, so that record keeps its line, not the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _is_disk_full(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("absl").addFilter(_DiskFullWithoutTraceback())  # Orbax logs through absl


@contextlib.contextmanager
def _disk_full_as_error(mngr: ocp.CheckpointManager, step):
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax wraps the OSError in its own types
        if not _is_disk_full(e):
            raise
        mngr.reload()  # what is on disk: a failed step stays a tmp folder
        complete = [s for s in mngr.all_steps() if s != step]
        raise _disk_full(str(mngr.directory), f"saving step {step}", complete) from e


def _disk_full(where: str, doing: str, complete: list[int]) -> CheckpointError:
    kept = f"the last complete checkpoint (step {max(complete)}) is kept" if complete else "no checkpoint is complete"
    return CheckpointError(
        f"no space left on the device of {where} while {doing}: {kept}. Free space there (or "
        "pass a --workdir on another disk) and run the same command again to resume."
    )


def disk_full_error(workdir: str, e: BaseException) -> CheckpointError | None:
    """The CheckpointError for a full disk met outside a save (metrics, pictures), None for other errors."""
    if isinstance(e, CheckpointError) or not _is_disk_full(e):
        return None
    where = checkpoint_path(workdir)
    complete = sorted(int(p.name) for p in where.iterdir() if p.name.isdigit()) if where.is_dir() else []
    name = getattr(e, "filename", None)
    return _disk_full(fileio.display(workdir), f"writing {name}" if name else "writing its logs or pictures", complete)


# ----------------------------------------------------------------------------- the best EMA params (keep_best)

BEST_DIR = "best"  # <workdir>/best/<step>: the EMA params with the lowest validation value so far
BEST_PARAMS, BEST_INFO = "ema_params", "selection"  # its two items: the params, and {step, metric, value} as JSON


@dataclasses.dataclass(frozen=True)
class Best:
    """A kept best checkpoint: its step, the validation metric that chose it and its value there."""

    step: int
    metric: str
    value: float


def best_path(workdir) -> epath.Path:
    return fileio.as_path(workdir) / BEST_DIR


def make_best_manager(workdir: str, *, read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of <workdir>/best: synchronous saves, each step's params and its selection info in one
    Orbax step (written to a tmp folder and renamed when complete, like the training checkpoints, so a kill
    leaves the previous best). The two newest are kept; `read_best` takes the lowest value among them."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=None if read_only else 2),
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(BEST_PARAMS, args, ocp.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add(BEST_INFO, args, ocp.JsonCheckpointHandler)
    return ocp.CheckpointManager(best_path(workdir), options=options, handler_registry=registry)


def read_best(mngr: ocp.CheckpointManager) -> Best | None:
    """The kept best with the lowest value (ties: the earlier step), read from its JSON item only; None if none.

    Raises:
      CheckpointError: a kept best cannot be read (names the folder).
    """
    mngr.reload()
    found = []
    for step in mngr.all_steps():
        where = str(epath.Path(mngr.directory) / str(step))
        try:
            info = mngr.restore(step, args=ocp.args.Composite(**{BEST_INFO: ocp.args.JsonRestore()}))[BEST_INFO]
            found.append(Best(int(info["step"]), str(info["metric"]), float(info["value"])))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable folders
            raise CheckpointError(
                f"the best checkpoint {where} cannot be read ({type(e).__name__}: {str(e)[:200]}): delete that "
                "folder (the run then keeps the next best it evaluates), or train into a new --workdir."
            ) from e
    return min(found, key=lambda b: (b.value, b.step)) if found else None


def save_best(mngr: ocp.CheckpointManager, best: Best, ema_params) -> None:
    """Saves the EMA params (unreplicated) as the best at best.step, and waits until it is on disk."""
    if best.step in mngr.all_steps():  # already kept (a resume that evaluated this step again)
        return
    info = {"step": best.step, "metric": best.metric, "value": best.value}
    args = ocp.args.Composite(
        **{BEST_PARAMS: ocp.args.StandardSave(jax.device_get(ema_params)), BEST_INFO: ocp.args.JsonSave(info)}
    )
    with _disk_full_as_error(mngr, best.step):
        mngr.save(best.step, args=args, force=True)
        mngr.wait_until_finished()


def restore_best_params(mngr: ocp.CheckpointManager, step: int, target):
    """The EMA params kept at step, shaped like target (host NumPy leaves).

    Raises:
      CheckpointError: they cannot be read or do not fit target.
    """
    where = str(epath.Path(mngr.directory) / str(step))
    try:
        args = ocp.args.Composite(**{BEST_PARAMS: ocp.args.StandardRestore(_host_target(target))})
        return jax.device_get(mngr.restore(step, args=args)[BEST_PARAMS])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"the best checkpoint {where} cannot be read or does not fit the model ({type(e).__name__}: "
            f"{str(e)[:200]}): delete {BEST_DIR}/ to report the last step, or train into a new --workdir."
        ) from e


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
    fallback = (
        f"Delete that folder to resume from the previous checkpoint (step {older[-1]})"
        if older
        else "Delete that folder to start afresh"
    )
    return CheckpointError(
        f"the checkpoint {where} is damaged or incomplete and cannot be read "
        f"({type(e).__name__}: {str(e)[:300]}). {fallback}, or train into a new --workdir."
    )


def restore_latest(mngr: ocp.CheckpointManager, target):
    """Restores the newest complete checkpoint into the structure of `target`; None if there is none.

    Args:
      mngr: from `make_manager`.
      target: a state of the right structure and shapes: abstract (`jax.eval_shape`) or concrete.

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
    where = str(epath.Path(mngr.directory) / str(step))
    try:
        if not (epath.Path(where) / DEFAULT_ITEM).exists():  # Orbax would read it as a checkpoint of no items
            raise FileNotFoundError(f"no {DEFAULT_ITEM!r} item in it")
        stored = mngr.metadata(step).item_metadata
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable folders
        raise _damaged(where, e, older) from e
    if stored is None:
        raise _damaged(where, FileNotFoundError("no readable metadata"), older)
    target = _host_target(target)
    renamed = _renamed_fields(stored, target)
    mismatches = _shape_mismatches(stored, _as_saved(target, renamed))
    legacy = bool(mismatches) and hasattr(target, "tx") and _optax_flatten_fits(stored, target, renamed)
    if legacy:  # optim.flatten's checkpoints before issue 24 hold Adam's moments as optax.flatten's vectors
        target, mismatches = _host_target(flat_state.optax_flatten_target(target)), []
    if mismatches:
        raise CheckpointError(
            f"the checkpoint {where} was made for another model or image size: {'; '.join(mismatches[:3])}. "
            "Train into a new --workdir, or use the config the checkpoint was trained with."
        )
    try:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(_as_saved(target, renamed)))
    except Exception as e:  # noqa: BLE001
        raise _damaged(where, e, older) from e
    if renamed:  # back from the checkpoint's names to the state's
        now = {old: new for new, old in renamed.items()}
        restored = target.replace(**{now.get(k, k): v for k, v in restored.items()})
    restored = jax.device_get(restored)
    return flat_state.from_optax_flatten(restored) if legacy else restored


def _optax_flatten_fits(stored, target, renamed) -> bool:
    try:
        return not _shape_mismatches(stored, _as_saved(_host_target(flat_state.optax_flatten_target(target)), renamed))
    except Exception:  # noqa: BLE001 - not a train state of one dtype: the mismatch error stands
        return False


def _renamed_fields(stored, target) -> dict[str, str]:
    """{field of target: its name in the checkpoint} for the RENAMED_FIELDS the checkpoint has under
    their old name (a checkpoint written before the rename)."""
    if not hasattr(stored, "keys") or not dataclasses.is_dataclass(target):  # Orbax's tree metadata: a mapping
        return {}
    stored = set(stored.keys())
    return {
        new: old for old, new in RENAMED_FIELDS.items() if old in stored and new not in stored and hasattr(target, new)
    }


def _as_saved(target, renamed: dict[str, str]):
    """The restore target as the checkpoint names it: target itself, or, with renamed fields, a dict of
    its pytree fields under their names in the checkpoint (TrainState.replace rebuilds it after)."""
    if not renamed:
        return target
    fields = (f.name for f in dataclasses.fields(target) if f.metadata.get("pytree_node", True))
    return {renamed.get(name, name): getattr(target, name) for name in fields}


def _host_target(target):
    """Restore target on the host CPU: shapes and dtypes only, nothing allocated before the read."""
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    dtype = lambda x: x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), dtype(x), sharding=cpu), target)


def check_compatible(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str, frozen_fields
) -> None:
    """Raises CheckpointError if `config` changes one of `frozen_fields` (the sections and fields that
    fix the shapes or the meaning of a checkpoint: the method's `frozen_fields`) of the run in workdir.
    Everything else (steps, lr, logging) may change between a run and its resume."""
    old, new = configuration.flatten(saved), configuration.flatten(config)
    frozen = lambda k: any(k == f"config.{f}" or k.startswith(f"config.{f}.") for f in frozen_fields)
    diffs = [
        f"{k}={old[k]!r} in the checkpoint, {new[k]!r} now"
        for k in sorted(set(old) & set(new))
        if frozen(k) and old[k] != new[k]
    ]  # fields both know
    if diffs:
        raise CheckpointError(
            f"{fileio.display(workdir)} holds a run trained with another model or image size: {'; '.join(diffs[:4])}"
            f"{' ...' if len(diffs) > 4 else ''}. Pass the run's values (see {fileio.as_path(workdir) / CONFIG_FILE}) "
            "to resume it, or train into a new --workdir."
        )


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    fileio.atomic_write(fileio.as_path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2))


def load_config(workdir: str, *, required: bool = True) -> ml_collections.ConfigDict | None:
    """The config a run in workdir was started with; None (or CheckpointError if required) if absent."""
    path = fileio.as_path(workdir) / CONFIG_FILE
    if not path.exists():
        if not required:
            return None
        raise CheckpointError(
            f"no training run in {workdir!r} ({CONFIG_FILE} is missing): pass the --workdir that train.py wrote to."
        )
    try:
        tree = json.loads(path.read_text())
        if not isinstance(tree, dict):
            raise ValueError(f"it holds {json.dumps(tree)[:40]}, not a JSON object of config sections")
        return ml_collections.ConfigDict(_lists_to_tuples(tree))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}): restore it from a backup, or "
            "pass the run's config explicitly to train.py, which rewrites it."
        ) from e


def _lists_to_tuples(tree):
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    return tuple(tree) if isinstance(tree, list) else tree
