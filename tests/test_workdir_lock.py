"""The workdir lock of train.py (ddpm_jax/workdir_lock.py): fast, no JAX.

Lock records of other holders are written by hand where a real process is not needed; the two-process
tests run real child Python processes (one holds and sleeps; several race for the same stale lock).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from ddpm_jax import errors
from ddpm_jax.training import workdir_lock

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(**over) -> dict:
    """A lock record of a live process of this machine (pytest's parent), changed by `over`."""
    pid = os.getppid()
    rec = {
        **workdir_lock._machine(),
        "pid": pid,
        "proc_start": workdir_lock._proc_start(pid),
        "start_time": "2024-01-02 03:04:05+00:00",
        "heartbeat": time.time(),
        "command": "python train.py",
        "token": "othertoken",
    }
    return {**rec, **over}


def _write(workdir, rec) -> str:
    path = os.path.join(workdir, "run.lock")
    with open(path, "w") as f:
        f.write(rec if isinstance(rec, str) else json.dumps(rec))
    return path


def _acquire(workdir, **kw):
    said = []
    lock = workdir_lock.acquire(str(workdir), say=said.append, **kw)
    return lock, said


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_acquire_on_empty_workdir_writes_the_record_and_release_removes_it(tmp_path):
    workdir = tmp_path / "new" / "run"
    lock, said = _acquire(workdir, command="python train.py --workdir=x")
    rec = json.loads((workdir / "run.lock").read_text())
    assert said == [] and lock.path == str(workdir / "run.lock")
    assert (rec["host"], rec["pid"], rec["command"]) == (
        socket.gethostname(),
        os.getpid(),
        "python train.py --workdir=x",
    )
    assert rec["start_time"] and abs(rec["heartbeat"] - time.time()) < 5 and rec["token"] == lock.record["token"]
    lock.release()
    lock.release()  # twice is fine
    assert os.listdir(workdir) == []


def test_live_holder_refuses_with_who_and_the_fix(tmp_path):
    path = _write(tmp_path, _record())
    before = open(path).read()
    with pytest.raises(errors.WorkdirLocked) as e:
        _acquire(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, errors.UserError)
    for part in (
        socket.gethostname(),
        f"pid {os.getppid()}",
        "2024-01-02 03:04:05",
        "last heartbeat",
        f"kill {os.getppid()}",
        "SIGTERM",
        "--workdir",
        "sample.py",
        "python train.py",
    ):
        assert part in msg, part
    assert open(path).read() == before and os.listdir(tmp_path) == ["run.lock"]


def test_permission_error_means_alive(tmp_path, monkeypatch):
    def kill(pid, sig):
        raise PermissionError

    monkeypatch.setattr(workdir_lock.os, "kill", kill)
    _write(tmp_path, _record(pid=12345, proc_start=None))
    with pytest.raises(errors.WorkdirLocked, match="pid 12345"):
        _acquire(tmp_path)


@pytest.mark.parametrize("pid", [_dead_pid(), 99_999_999, 2**40])
def test_dead_pid_is_taken_over_and_its_lock_kept(tmp_path, pid):
    old = _record(pid=pid, proc_start=None, heartbeat=time.time())
    _write(tmp_path, old)
    lock, said = _acquire(tmp_path)
    assert said[0].startswith(
        f"Taking over the lock of {socket.gethostname()}:{pid} (started 2024-01-02 03:04:05"
        f"+00:00): that process is gone."
    )
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.record["token"]
    assert json.loads((tmp_path / "run.lock.stale-othertoken").read_text()) == old  # nothing deleted
    lock.release()
    assert os.listdir(tmp_path) == ["run.lock.stale-othertoken"]


@pytest.mark.skipif(workdir_lock._proc_start(os.getpid()) is None, reason="no /proc start times here")
def test_reused_pid_is_taken_over(tmp_path):
    _write(tmp_path, _record(proc_start=workdir_lock._proc_start(os.getppid()) + 1))
    lock, said = _acquire(tmp_path)
    assert "its pid belongs to another process now" in said[0]
    lock.release()


def test_rebooted_machine_and_unreadable_lock_are_taken_over(tmp_path):
    if workdir_lock._machine()["boot_id"]:
        _write(tmp_path, _record(boot_id="another-boot"))
        lock, said = _acquire(tmp_path)
        assert "restarted" in said[0]
        lock.release()
    _write(tmp_path, "{not json")
    lock, said = _acquire(tmp_path)
    assert "unreadable" in said[0]
    lock.release()


def test_other_host_is_taken_over_only_after_its_heartbeat_is_stale(tmp_path):
    _write(tmp_path, _record(host="elsewhere", pid=1, heartbeat=time.time() - 30))
    with pytest.raises(errors.WorkdirLocked, match="host elsewhere.*taken over once its heartbeat is 60 s old"):
        _acquire(tmp_path, stale_after_s=60)
    _write(tmp_path, _record(host="elsewhere", pid=1, heartbeat=time.time() - 120))
    lock, said = _acquire(tmp_path, stale_after_s=60)
    assert said[0].startswith("Taking over the lock of elsewhere:1 (started") and "no heartbeat for 120 s" in said[0]
    lock.release()


def test_same_host_other_pid_namespace_waits_for_the_heartbeat(tmp_path):
    _write(tmp_path, _record(pid=99_999_999, pid_ns="pid:[1]"))  # a container: its pids mean nothing here
    with pytest.raises(errors.WorkdirLocked):
        _acquire(tmp_path)


def test_release_and_refresh_leave_another_holders_lock_alone(tmp_path):
    lock, _ = _acquire(tmp_path)
    other = _record(host="elsewhere", token="taker")
    _write(tmp_path, other)  # as if a taker had judged us gone
    with pytest.raises(errors.WorkdirLocked, match="lost the lock .* to elsewhere"):
        lock.refresh()
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text()) == other


def test_refresh_and_the_heartbeat_thread_rewrite_the_heartbeat(tmp_path):
    with workdir_lock.acquire(str(tmp_path), heartbeat_s=0.05) as lock:
        first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
        time.sleep(0.3)
        beat = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
        assert beat > first
        os.remove(tmp_path / "run.lock")  # removed by hand: the next beat puts it back
        lock.refresh()
        assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.record["token"]
    assert not (tmp_path / "run.lock").exists()


def test_other_processes_of_the_job_never_touch_the_lock(tmp_path):
    _write(tmp_path, _record(host="elsewhere"))  # held by process 0 of this job, on another host
    lock, said = _acquire(tmp_path, process_index=1)
    lock.refresh()
    lock.release()
    assert lock.path is None and said == [] and json.loads((tmp_path / "run.lock").read_text())["host"] == "elsewhere"
    with workdir_lock.acquire(str(tmp_path / "empty"), process_index=3):
        pass
    assert not (tmp_path / "empty").exists()


def test_remote_store_best_effort(tmp_path, monkeypatch):
    """The epath (remote workdir) path, run on a local folder."""
    monkeypatch.setattr(workdir_lock, "_LocalStore", workdir_lock._Store)
    monkeypatch.setattr(workdir_lock, "_SETTLE_S", 0.0)
    lock, said = _acquire(tmp_path)
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b", _record())
    with pytest.raises(errors.WorkdirLocked, match=f"pid {os.getppid()}"):
        _acquire(tmp_path / "b")
    _write(tmp_path / "b", _record(pid=99_999_999))
    lock_b, said = _acquire(tmp_path / "b")
    assert "that process is gone" in said[0] and (tmp_path / "b" / "run.lock.stale-othertoken").exists()
    for lk in (lock, lock_b):
        lk.release()
    assert not (tmp_path / "run.lock").exists() and not (tmp_path / "b" / "run.lock").exists()


_HOLDER = textwrap.dedent("""
    import sys, time
    from ddpm_jax import errors
    from ddpm_jax.training import workdir_lock
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together
    try:
        lock = workdir_lock.acquire(sys.argv[1], command="holder", say=lambda line: print(line, flush=True))
    except errors.WorkdirLocked:
        print("lost", flush=True)
        sys.exit(3)
    print("held", flush=True)
    time.sleep(60)
""")


def _holder(workdir, start_at=0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir), str(start_at)], cwd=_REPO, stdout=subprocess.PIPE, text=True
    )


def test_two_processes_live_then_killed(tmp_path):
    child = _holder(tmp_path)
    try:
        assert child.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(errors.WorkdirLocked) as e:
            _acquire(tmp_path)
        assert time.monotonic() - t0 < 5
        assert f"pid {child.pid} on host {socket.gethostname()}" in str(e.value) and "running `holder`" in str(e.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock, said = _acquire(tmp_path)
    assert said[0].startswith(f"Taking over the lock of {socket.gethostname()}:{child.pid}")
    assert "that process is gone" in said[0]
    lock.release()


def test_racing_takers_of_one_stale_lock_one_wins(tmp_path):
    _write(tmp_path, _record(pid=99_999_999))
    start_at = time.time() + 1.0
    children = [_holder(tmp_path, start_at) for _ in range(4)]
    try:
        outs = [child.stdout.readline().strip() for child in children]
        outs += [child.stdout.readline().strip() for child, out in zip(children, outs) if out.startswith("Taking")]
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert sorted(outs).count("held") == 1 and outs.count("lost") == 3, outs
    assert sum(out.startswith("Taking over") for out in outs) == 1, outs
