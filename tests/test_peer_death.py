"""A peer that dies. Two train.py processes (jax.distributed + gloo on CPU), process 1 killed with
SIGKILL once a checkpoint is complete: the survivor (process 0, the coordinator) says in one line on
stderr which process stopped, the last complete checkpoint and that the whole job must be restarted,
and exits with status 1 at once: no Python traceback, and no wait for the coordination service's
heartbeat timeout (100 s), after which JAX would abort it with a C++ stack dump (status 134).
PeerWatch, which notices a peer whose collective hangs instead of failing, on a fake key-value store."""

import socket
import subprocess
import sys
import threading
import time

import jax
import pytest

from ddpm_jax.training import distributed

from helpers import fault_utils as fu

PROMPT_S = 30  # well under the 100 s heartbeat timeout that ends in JAX's abort


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _Store:
    """jax.distributed's key-value store, as PeerWatch uses it; `gone` makes every call fail."""

    def __init__(self):
        self.values, self.gone = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.gone:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.gone:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_peer_watch(monkeypatch):
    """Of three processes (this one is 0), 1 keeps beating and 2 stops: 2 is lost, once, after lost_after_s;
    a peer that wrote "done" is never lost; a store that is gone means process 0 is (for process 1)."""
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    store, lost, key = _Store(), [], distributed.PeerWatch.PEER_KEY
    beating = threading.Event()

    def beat_1():
        n = 0
        while not beating.is_set():
            store.key_value_set(f"{key}1", f"alive:{n}")
            n += 1
            time.sleep(0.01)

    threading.Thread(target=beat_1, daemon=True).start()
    store.key_value_set(f"{key}2", "alive:0")  # once, then never again
    started = time.monotonic()
    watch = distributed.PeerWatch(
        lambda who: lost.append((who, time.monotonic() - started)), client=store, beat_s=0.02, lost_after_s=0.5
    )
    time.sleep(1.2)
    watch.stop(clean=True)
    beating.set()
    assert [who for who, _ in lost] == ["process 2"] and 0.5 < lost[0][1] < 1.0
    assert store.values[f"{key}0"] == "done"

    lost.clear()
    store.key_value_set(f"{key}1", "done")
    store.key_value_set(f"{key}2", "done")
    watch = distributed.PeerWatch(lost.append, client=store, beat_s=0.02, lost_after_s=0.2)
    time.sleep(0.5)
    watch.stop(clean=False)
    assert lost == [] and store.values[f"{key}0"].startswith("alive:")  # not "done": it did not end cleanly

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    store.gone = True
    watch = distributed.PeerWatch(lost.append, client=store, beat_s=0.02, lost_after_s=10)
    time.sleep(0.2)
    watch.stop()
    assert lost == ["process 0"]


def test_peer_lost_knows_a_broken_collective_in_either_form(monkeypatch):
    """A dead peer's collective fails as a JaxRuntimeError in a step, but as a ValueError with the same text
    from the jitted all-gather of orbax's sync before a checkpoint save (seen with the flat train state);
    both, and either wrapped by another exception, are a lost peer. Other errors, or one process, are not."""
    gloo = "UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error [127.0.0.1]:22414: Connection reset by peer"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert distributed.peer_lost(jax.errors.JaxRuntimeError(gloo))
    assert distributed.peer_lost(ValueError(gloo))
    try:
        try:
            raise ValueError(gloo)
        except ValueError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as wrapped:
        assert distributed.peer_lost(wrapped)
    assert not distributed.peer_lost(ValueError("config.model.ch=7 must be divisible by 8"))
    assert not distributed.peer_lost(RuntimeError(gloo))  # not what a collective raises
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert not distributed.peer_lost(ValueError(gloo))


@pytest.mark.slow  # two train.py processes
def test_survivor_says_one_line_and_exits(data_dir, tmp_path, tmp_path_factory):
    env = fu.env(str(tmp_path_factory.getbasetemp()), data_dir, devices=1)
    workdir = str(tmp_path / "run")
    flags = fu.micro_flags(
        **{"training.num_train_steps": 100_000, "training.checkpoint_every": 4, "training.log_every": 2}
    )
    address = f"localhost:{_free_port()}"
    procs, errs = [], []
    try:
        for i in range(2):
            errs.append(str(tmp_path / f"err{i}.txt"))
            with open(tmp_path / f"out{i}.txt", "w") as out, open(errs[-1], "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "train.py", *flags, f"--workdir={workdir}", f"--coordinator_address={address}"]
                        + ["--num_processes=2", f"--process_id={i}"],
                        cwd=fu.ROOT,
                        env=env,
                        stdout=out,
                        stderr=err,
                    )
                )
        fu.wait_for(lambda: fu.committed_steps(workdir), procs[0], timeout=300, what="a complete checkpoint")
        assert fu.kill(procs[1]) == -9
        killed = time.time()
        code = procs[0].wait(timeout=PROMPT_S)
        waited = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stderr = open(errs[0]).read()
    last = max(fu.committed_steps(workdir))  # listed now: what a restart resumes from
    expected = (
        f"error: process 1 of this job stopped; the last complete checkpoint is step {last} in {workdir}/checkpoints: "
        "restart the whole job to resume."
    )
    assert code == 1 and waited < PROMPT_S, stderr[-3000:]
    assert expected in stderr.splitlines(), stderr[-3000:]
    assert "Traceback" not in stderr and "stack trace" not in stderr
