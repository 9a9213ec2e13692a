"""Many devices and hosts: starting jax.distributed, copying a state onto the devices and back
(replicate / unreplicate, laid out on the steps' device axis AXIS), and host-side views of pmapped
values.

One process per host, every process runs the same program (SPMD). After `initialize`, jax.pmap
spans the devices of all processes, `jax.process_index()` picks this process's data shard, and
only process 0 writes logs and pictures. Nothing here replaces JAX's own machinery: it reads the
flags or environment, starts `jax.distributed`, and fetches values to the host without touching
other processes' devices.

  python train.py --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # on host 0
  python train.py --coordinator_address=host0:1234 --num_processes=2 --process_id=1   # on host 1

or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or pass --distributed on a
cluster JAX detects by itself (SLURM, Open MPI, Kubernetes, Cloud TPU).
"""

from __future__ import annotations

import os
import threading
import time

import jax
import numpy as np

from ddpm_jax.errors import UserError

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
AXIS = "batch"  # the device axis the pmapped steps (train_lib) average over


class DistributedError(UserError, ValueError):
    """Bad or inconsistent multi-process settings; the message says which and how to fix them."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer.") from None


def _check(address: str | None, num_processes: int | None, process_id: int | None) -> None:
    missing = [
        flag
        for flag, v in (
            ("--coordinator_address", address),
            ("--num_processes", num_processes),
            ("--process_id", process_id),
        )
        if v is None
    ]
    if missing:
        raise DistributedError(
            f"a multi-process run needs --coordinator_address, --num_processes and --process_id (or "
            f"{ENV_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); {', '.join(missing)} not given. Pass all "
            "three, or --distributed on a cluster JAX detects by itself."
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(
            f"--coordinator_address={address!r} must be host:port (e.g. 10.0.0.1:1234), the "
            "address of process 0, the same on every process."
        )
    if num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes} must be >= 1.")
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id={process_id} must be in [0, {num_processes}): one distinct id per "
            "process, 0 on the coordinator's host."
        )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """Starts jax.distributed when the arguments or the environment ask for it.

    Must run before anything touches a JAX device. On CPU, cross-process collectives go through
    gloo, JAX's default (`jax_cpu_collectives_implementation`, "gloo" since before jax 0.8.2).

    Args:
      coordinator_address: host:port of process 0; default $JAX_COORDINATOR_ADDRESS.
      num_processes: default $JAX_NUM_PROCESSES.
      process_id: this process's index; default $JAX_PROCESS_ID.
      auto: let JAX detect the cluster (SLURM, Open MPI, ...) for the values not given.
      timeout_s: how long to wait for the other processes to join.

    Returns:
      True if jax.distributed was initialised (a multi-process run), False for a single process.

    Raises:
      DistributedError: missing or inconsistent settings, or the processes could not connect.
    """
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    num = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if not auto:
        if address is None and num is None and pid is None:
            return False
        _check(address, num, pid)
        if num == 1:
            return False
    try:
        jax.distributed.initialize(address, num, pid, initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - connection, cluster-detection and runtime errors alike
        raise DistributedError(
            f"could not start jax.distributed (coordinator {address}, process {pid} of {num}): "
            f"{type(e).__name__}: {e}. Start every process with the same --coordinator_address and "
            "--num_processes and a distinct --process_id, and check that process 0's host:port is "
            "reachable from all of them."
        ) from e
    return True


# What a collective's error says when a peer process is gone: gloo's TCP pairs (CPU), NCCL (GPU), the
# coordination service's heartbeats.
PEER_LOST_MARKS = ("Gloo", "Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL", "heartbeat")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is a multi-process run's collective that failed because another process is gone
    (killed, crashed, its host lost): a JaxRuntimeError, or the ValueError that jax raises for the same
    failure from a jitted call's dispatch (orbax's sync_global_processes during a checkpoint save), whose
    text names the transport that broke; also when it is the cause or context of `e`."""
    if jax.process_count() == 1:
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, jax.errors.JaxRuntimeError | ValueError) and any(m in str(e) for m in PEER_LOST_MARKS):
            return True
        e = e.__cause__ or e.__context__
    return False


def lost_peer_name() -> str:
    """Which process a lost peer is: with two, the other one; with more, the error does not say."""
    return f"process {1 - jax.process_index()}" if jax.process_count() == 2 else "a peer process"


class PeerWatch:
    """Calls `on_lost(name)` ("process 1", or "a peer process"; it must end this process) from its own thread when another process
    of the job stops, so that a process whose collective with the dead peer hangs instead of failing
    (several devices per process; a host gone without a TCP reset) says so within `lost_after_s`,
    not after the coordination service's heartbeat timeout (100 s) and JAX's abort.

    Every `beat_s` each process writes `alive:<count>` under PEER_KEY in jax.distributed's key-value
    store (held by the coordination service, in process 0) and reads the others'. A peer is lost when
    its count has not changed for `lost_after_s` (its own thread beats even while its main thread
    computes or waits), or, for a process other than 0, when the store cannot be reached (process 0
    is gone). `stop(clean=True)` writes `done`, so that a process that finished first is not lost.
    """

    PEER_KEY = "ddpm_jax/peers/"

    def __init__(self, on_lost, *, client=None, beat_s: float = 1.0, lost_after_s: float = 20.0):
        from jax._src import distributed as jax_distributed

        self.client = client if client is not None else jax_distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.on_lost, self.beat_s, self.lost_after_s = on_lost, beat_s, lost_after_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddpm_jax-peer-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start, beats, seen = time.monotonic(), 0, {}  # seen: {process: (its value, when it last changed)}
        while not self._stopped.is_set():
            try:
                self.client.key_value_set(f"{self.PEER_KEY}{self.me}", f"alive:{beats}", allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(self.PEER_KEY))
            except Exception:  # noqa: BLE001 - the store (process 0's coordination service) is gone
                if not self._stopped.is_set():
                    self.on_lost("process 0" if self.me != 0 else "a peer process")
                return
            now = time.monotonic()
            for process in range(self.count):
                value = values.get(f"{self.PEER_KEY}{process}")
                if process == self.me or value == "done":
                    continue
                last, since = seen.get(process, (None, start))
                if value != last:
                    seen[process] = (value, now)
                elif now - since > self.lost_after_s and not self._stopped.is_set():
                    self.on_lost(f"process {process}")
                    return
            beats += 1
            self._stopped.wait(self.beat_s)

    def stop(self, clean: bool = True) -> None:
        """Stops watching; `clean`: this process ends normally (the others will not take it as lost)."""
        self._stopped.set()
        self._thread.join(timeout=max(5.0, 2 * self.beat_s))
        if clean:
            try:
                self.client.key_value_set(f"{self.PEER_KEY}{self.me}", "done", allow_overwrite=True)
            except Exception:  # noqa: BLE001 - nobody is left to tell
                pass


def is_main_process() -> bool:
    return jax.process_index() == 0


def _local_stack(x) -> np.ndarray:
    if isinstance(x, jax.Array):
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data).reshape((-1,) + x.shape[1:]) for s in shards])
    return np.asarray(x)


def local_values(tree):
    """Host copy of a pmapped output's entries for this process's devices: [local devices, ...]."""
    return jax.tree_util.tree_map(_local_stack, tree)


def any_process(flag: bool) -> bool:
    """True if `flag` is True on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def max_over_processes(value: int) -> int:
    """The largest `value` over all processes (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def replicate(tree, devices=None):
    """Copies a pytree onto every local device, laid out exactly as the pmapped steps return it.

    flax.jax_utils.replicate uses another mesh axis name, which made the second call of every
    pmapped function compile again (a minute for the UNet on CPU).
    """
    devices = jax.local_devices() if devices is None else devices
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (len(devices),) + np.shape(x))
    return jax.device_put(jax.tree_util.tree_map(stack, tree), sharding)


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as host (NumPy) arrays."""

    def first(x):
        if isinstance(x, jax.Array) and len(x.addressable_shards) > 0:
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x)[0]

    return jax.tree_util.tree_map(first, tree)
