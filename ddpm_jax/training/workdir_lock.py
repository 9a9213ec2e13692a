"""One training run per workdir: `<workdir>/run.lock`, held by process 0 of the job training there.

A second train.py on a workdir that a live run holds stops at once with `errors.WorkdirLocked`, naming
the holder (host, pid, start time, last heartbeat) and what to do instead. A lock whose holder is gone
is taken over with one line. Gone means: on this machine (same host name, boot and pid namespace), its
pid is dead or belongs to another process now (another start time), or the machine has rebooted since;
elsewhere, no heartbeat for `stale_after_s`. A daemon thread rewrites the heartbeat every
`stale_after_s / 4`, so a long compile or evaluation never looks dead. Nothing is deleted but our own
lock: a taken-over one is kept as `run.lock.stale-<token>`, and creating that file exclusively is what
makes one taker win when several find the same stale lock. Processes other than process 0 of a job get
a no-op lock, so they are never locked out; sample.py and evaluate only read a workdir and take none.

Local paths (NFS included) are created atomically (hard link, else O_EXCL). Remote workdirs (gs://,
s3://, ...) go through etils.epath, which has no exclusive create: a write-wait-verify check stands in
there, so two runs started within about a second of each other may both get the lock.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

from etils import epath

from ddpm_jax import errors

LOCK_NAME = "run.lock"
_SETTLE_S = 1.0  # remote workdirs: wait this long before checking that our write stayed


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        return int(_read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19])
    except (AttributeError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _machine() -> dict:
    return {
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None,
    }


def _who(rec: dict) -> str:
    return f"{rec['host']}:{rec['pid']} (started {rec.get('start_time', '?')})"


def _gone(rec: dict, stale_after_s: float) -> str | None:
    """Why the holder of lock record rec is gone, or None while it may be alive."""
    here = _machine()
    if rec["host"] == here["host"]:
        if None not in (rec.get("boot_id"), here["boot_id"]) and rec["boot_id"] != here["boot_id"]:
            return "its machine has restarted since"
        if rec.get("pid_ns") == here["pid_ns"]:  # its pid means the same here: no need to wait
            if rec["pid"] == os.getpid():
                return "it was left by this process"
            if not _alive(rec["pid"]):
                return "that process is gone"
            start = _proc_start(rec["pid"])
            if None not in (start, rec.get("proc_start")) and start != rec["proc_start"]:
                return "that process is gone (its pid belongs to another process now)"
            return None
    age = time.time() - rec["heartbeat"]
    return f"no heartbeat for {age:.0f} s, so its host is taken as lost" if age > stale_after_s else None


def _parse(raw: bytes | None) -> dict | None:
    try:
        rec = json.loads(raw) if raw else None
    except ValueError:
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("token"), str) and isinstance(rec.get("host"), str)
    ok = ok and isinstance(rec.get("pid"), int) and rec["pid"] > 0 and isinstance(rec.get("heartbeat"), (int, float))
    return rec if ok else None


class _Store:
    """Files of one workdir through etils.epath; create() is best effort (remote workdirs)."""

    def __init__(self, workdir: str):
        self.dir = epath.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return os.fspath(self.dir / name)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.dir / name).read_bytes()
        except Exception:  # backends differ in how they say "not found"
            if (self.dir / name).exists():
                raise
            return None

    def create(self, name: str, data: bytes) -> bool:
        """Writes name only if it does not exist yet; here: write, wait, and check that our write stayed."""
        if (self.dir / name).exists():
            return False
        (self.dir / name).write_bytes(data)
        time.sleep(_SETTLE_S)
        return self.read(name) == data

    def replace(self, name: str, data: bytes) -> None:
        (self.dir / name).write_bytes(data)


class _LocalStore(_Store):
    """Atomic: readers see a whole file or none, and only one create() of a name wins."""

    def _tmp(self, name: str, data: bytes) -> str:
        (tmp := self.dir / f".{name}.{uuid.uuid4().hex}.tmp").write_bytes(data)
        return os.fspath(tmp)

    def create(self, name: str, data: bytes) -> bool:
        tmp = self._tmp(name, data)
        try:
            os.link(tmp, self.path(name))
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            try:
                fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            os.unlink(tmp)  # our own temporary file

    def replace(self, name: str, data: bytes) -> None:
        os.replace(self._tmp(name, data), self.path(name))


class WorkdirLock:
    """A held lock: refresh() beats, release() (or leaving a `with`) gives it back. A no-op if path is None."""

    def __init__(self, store: _Store | None, record: dict | None, heartbeat_s: float = 0):
        self.path, self.record, self._store = store.path(LOCK_NAME) if store else None, record, store
        self._lost: str | None = None
        self._stop, self._mutex = threading.Event(), threading.Lock()
        if store:
            threading.Thread(target=self._beat, args=(heartbeat_s,), name="workdir-lock", daemon=True).start()

    def refresh(self) -> None:
        """Rewrites the heartbeat; raises WorkdirLocked if another process has taken the lock over."""
        with self._mutex:
            if self._store is None or self._stop.is_set():
                return
            if self._lost is None:
                self.record["heartbeat"] = time.time()
                data = json.dumps(self.record).encode()
                held = _parse(raw := self._store.read(LOCK_NAME))
                if raw is None and self._store.create(LOCK_NAME, data):
                    return  # removed by hand: put it back
                if held and held["token"] == self.record["token"]:
                    return self._store.replace(LOCK_NAME, data)
                self._lost = (
                    f"this run lost the lock {self.path}"
                    + (f" to {_who(held)}" if held else "")
                    + "; stop it, so that two runs do not write the same workdir."
                )
            raise errors.WorkdirLocked(self._lost)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours, never another's."""
        self._stop.set()
        with self._mutex:
            held = _parse(self._store.read(LOCK_NAME)) if self._store else None
            if held and held["token"] == self.record["token"]:
                (self._store.dir / LOCK_NAME).unlink()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(max(every_s, 0.01)):
            try:
                self.refresh()
            except errors.WorkdirLocked:
                return
            except Exception:  # a transient I/O error: the next beat retries
                pass

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_message(workdir: str, path: str, rec: dict, stale_after_s: float) -> str:
    pid, host, age = rec["pid"], rec["host"], max(time.time() - rec["heartbeat"], 0)
    running = f", running `{rec['command']}`" if rec.get("command") else ""
    lost = (
        f" If {host} is lost for good, the lock is taken over once its heartbeat is {stale_after_s:.0f} s old."
        if host != socket.gethostname()
        else ""
    )
    return (
        f"workdir {workdir} is in use by another run: pid {pid} on host {host} (started "
        f"{rec.get('start_time', '?')}, last heartbeat {age:.0f} s ago{running}; lock {path}). Wait for it to "
        f"finish, or stop it with `kill {pid}` on {host} (it saves a checkpoint on SIGTERM) and rerun this "
        f"command to resume, or pass another --workdir.{lost} Meanwhile `python sample.py --workdir={workdir}` "
        f"and `python -m ddpm_jax.evaluate --workdir={workdir}` can read the run."
    )


def check(workdir: str, *, stale_after_s: float = 600.0) -> None:
    """Raises errors.WorkdirLocked if a live run holds workdir's lock; takes nothing, creates nothing.

    train.py calls it first (process 0 only), so that a second run on a busy workdir refuses within
    a second or two instead of after loading JAX and TensorFlow; `acquire` is what takes the lock.
    """
    path = epath.Path(workdir) / LOCK_NAME
    try:
        raw = path.read_bytes()
    except Exception:  # no lock (backends differ in how they say so), or unreadable now: acquire decides
        return
    held = _parse(raw)
    if held and _gone(held, stale_after_s) is None:
        raise errors.WorkdirLocked(_held_message(str(workdir), os.fspath(path), held, stale_after_s))


def acquire(
    workdir: str,
    *,
    command: str | None = None,
    stale_after_s: float = 600.0,
    process_index: int = 0,
    heartbeat_s: float | None = None,
    say: Callable[[str], object] = print,
) -> WorkdirLock:
    """Takes `<workdir>/run.lock` for this run (creating workdir), or raises errors.WorkdirLocked.

    Args:
      command: recorded in the lock and shown to a second run; default this process's argv.
      stale_after_s: a holder on another machine with no heartbeat for this long is taken as lost.
      process_index: jax.process_index(); only process 0 takes the lock, the others get a no-op one.
      heartbeat_s: how often the background thread beats; default stale_after_s / 4.
      say: prints the one line about a taken-over lock.
    """
    if process_index != 0:
        return WorkdirLock(None, None)
    store = (_Store if "://" in str(workdir) else _LocalStore)(str(workdir))
    path, claim = store.path(LOCK_NAME), None
    record = {
        **_machine(),
        "pid": os.getpid(),
        "proc_start": _proc_start(os.getpid()),
        "start_time": datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"),
        "heartbeat": time.time(),
        "command": shlex.join(sys.argv) if command is None else command,
        "token": uuid.uuid4().hex,
    }
    data = json.dumps(record).encode()
    for _ in range(5):
        took = None
        if not store.create(LOCK_NAME, data):
            if (raw := store.read(LOCK_NAME)) is None:
                continue  # released meanwhile
            held = _parse(raw)
            why = _gone(held, stale_after_s) if held else "its lock file is unreadable"
            if why is None:
                raise errors.WorkdirLocked(_held_message(str(workdir), path, held, stale_after_s))
            claim = f"{LOCK_NAME}.stale-{held['token'] if held else hashlib.sha1(raw).hexdigest()[:16]}"
            if not store.create(claim, raw):  # another process is taking this stale lock over
                time.sleep(0.1)
                continue
            store.replace(LOCK_NAME, data)
            took = f"Taking over the lock of {_who(held) if held else path}: {why}."
        if store.read(LOCK_NAME) == data:
            if took:
                say(f"{took} (Its lock is kept as {store.path(claim)}.)")
            return WorkdirLock(store, record, stale_after_s / 4 if heartbeat_s is None else heartbeat_s)
    raise errors.WorkdirLocked(
        f"could not take the lock {path}: it changed under every try"
        + (
            f"; {store.path(claim)} says another process is taking it over. If no other train.py is starting on this "
            f"workdir, one stopped while doing so: move that file aside and rerun."
            if claim
            else "; rerun."
        )
    )
