"""Two identical train.py runs on one workdir: the second must refuse at once, the first must not notice.

    python bench/concurrent_launch.py [--steps 400] [--checkpoint_every 5] [--workdir DIR] [--keep]

Starts `python train.py --config=configs/ddpm.py:runlocal --config.training.num_train_steps=400
--config.training.checkpoint_every=5 --config.training.final_bpd=False --workdir=<tmp>`, waits until
that process holds `<workdir>/run.lock` (the lock's pid is its pid), then starts the same command
again. Reports the second process's exit code, its time from start to exit (the time to refuse;
must be < 5 s), its `error: ...` line and whether its stderr holds a traceback; then waits for the
first to finish and reports its exit code, its checkpoint steps, leftover Orbax tmp folders, whether
run.lock is gone, and the duplicate steps in metrics.jsonl (must be 0). Prints a table and writes
bench/results/concurrent_launch.json. Trains the runlocal model (a minute or two on 2 CPU cores);
nothing is downloaded (the digits come from scikit-learn).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSE_LIMIT_S = 5.0


def _command(workdir: str, steps: int, checkpoint_every: int) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config=configs/ddpm.py:runlocal",
        f"--config.training.num_train_steps={steps}",
        f"--config.training.checkpoint_every={checkpoint_every}",
        "--config.training.final_bpd=False",
        f"--workdir={workdir}",
    ]


def _lock_pid(workdir: str) -> int | None:
    try:
        with open(os.path.join(workdir, "run.lock")) as f:
            return json.load(f).get("pid")
    except (OSError, ValueError):
        return None


def _checkpoint_steps(workdir: str) -> tuple[list[int], list[str]]:
    where = os.path.join(workdir, "checkpoints")
    names = os.listdir(where) if os.path.isdir(where) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "orbax-checkpoint-tmp" in n)


def _metrics(workdir: str) -> dict:
    """Duplicates: records of one kind (the same set of keys) logged twice for one step."""
    path = os.path.join(workdir, "metrics.jsonl")
    records, torn = [], 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    torn += 1
    seen = collections.Counter((r.get("step"), tuple(sorted(r))) for r in records)
    train_steps = [r["step"] for r in records if "loss" in r]
    return {
        "records": len(records),
        "torn_lines": torn,
        "duplicate_steps": sum(n - 1 for n in seen.values() if n > 1),
        "train_log_steps": len(train_steps),
        "last_logged_step": max(train_steps, default=0),
    }


def _tail(path: str, n: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def measure(workdir: str, steps: int, checkpoint_every: int, env: dict, logs: str) -> dict:
    cmd = _command(workdir, steps, checkpoint_every)
    out1, err1 = open(os.path.join(logs, "first.out"), "w"), open(os.path.join(logs, "first.err"), "w")
    t0 = time.monotonic()
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out1, stderr=err1, text=True)
    try:
        while _lock_pid(workdir) != first.pid:
            if first.poll() is not None:
                raise SystemExit(
                    f"the first run exited (rc {first.returncode}) before it took the lock:\n{_tail(err1.name)}"
                )
            if time.monotonic() - t0 > 300:
                raise SystemExit("the first run did not take the lock within 300 s")
            time.sleep(0.05)
        lock_after_s = time.monotonic() - t0
        steps_at_second = _metrics(workdir)["last_logged_step"]

        t1 = time.monotonic()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        refuse_s = time.monotonic() - t1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        lock_still_first = _lock_pid(workdir) == first.pid
        first_alive = first.poll() is None

        rc1 = first.wait(timeout=3600)
        total_s = time.monotonic() - t0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        out1.close()
        err1.close()
    with open(os.path.join(logs, "second.err"), "w") as f:
        f.write(second.stderr)
    ckpts, tmp = _checkpoint_steps(workdir)
    metrics = _metrics(workdir)
    return {
        "command": " ".join(cmd[1:]),
        "first_lock_after_s": round(lock_after_s, 2),
        "first_logged_step_when_second_started": steps_at_second,
        "second_exit_code": second.returncode,
        "second_time_to_refuse_s": round(refuse_s, 2),
        "second_refused_within_limit": refuse_s < REFUSE_LIMIT_S,
        "second_message": errors[0] if errors else second.stderr.strip().splitlines()[-1:],
        "second_error_lines": len(errors),
        "second_traceback": "Traceback" in second.stderr,
        "lock_still_first_after_second": lock_still_first,
        "first_alive_after_second": first_alive,
        "first_exit_code": rc1,
        "first_total_s": round(total_s, 1),
        "first_stderr_tail": _tail(os.path.join(logs, "first.err")) if rc1 else "",
        "checkpoint_steps": ckpts,
        "orbax_tmp_leftovers": tmp,
        "lock_removed_at_end": not os.path.exists(os.path.join(workdir, "run.lock")),
        "metrics": metrics,
        "results_json": os.path.exists(os.path.join(workdir, "results.json")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoint_every", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder (removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir and the logs")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "concurrent_launch.json"))
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="concurrent_launch_")
    workdir = args.workdir or os.path.join(tmp, "run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        result = measure(workdir, args.steps, args.checkpoint_every, env, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result.update(
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        workdir_kept=tmp if args.keep else None,
        checks={
            "second refused (exit != 0)": result["second_exit_code"] != 0,
            f"refused in < {REFUSE_LIMIT_S:.0f} s": result["second_refused_within_limit"],
            "no traceback in the second's stderr": not result["second_traceback"],
            "the first kept its lock": result["lock_still_first_after_second"],
            "first exit 0": result["first_exit_code"] == 0,
            "0 duplicate steps in metrics.jsonl": result["metrics"]["duplicate_steps"] == 0,
            "no Orbax tmp folders left": not result["orbax_tmp_leftovers"],
            "run.lock removed at the end": result["lock_removed_at_end"],
        },
    )

    m, c = result["metrics"], result["checkpoint_steps"]
    rows = [
        ("first run: took run.lock after", f"{result['first_lock_after_s']} s"),
        ("second run: exit code", result["second_exit_code"]),
        ("second run: time to refuse", f"{result['second_time_to_refuse_s']} s (limit {REFUSE_LIMIT_S:.0f} s)"),
        ("second run: message", str(result["second_message"])[:150] + " ..."),
        ("second run: traceback in stderr", result["second_traceback"]),
        ("lock still the first's", result["lock_still_first_after_second"]),
        ("first run: exit code", result["first_exit_code"]),
        ("first run: wall time", f"{result['first_total_s']} s"),
        ("first run: checkpoint steps", f"{c} (Orbax keeps the last 3)" if c else "none"),
        ("Orbax tmp folders left", result["orbax_tmp_leftovers"] or "none"),
        ("run.lock removed at the end", result["lock_removed_at_end"]),
        (
            "metrics.jsonl records / train logs",
            f"{m['records']} / {m['train_log_steps']} (last step {m['last_logged_step']})",
        ),
        ("metrics.jsonl duplicate steps", m["duplicate_steps"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("checks: " + ", ".join(f"{k}: {'ok' if ok else 'FAILED'}" for k, ok in result["checks"].items()))
    if result["first_stderr_tail"]:
        print("first run's stderr (tail):\n" + result["first_stderr_tail"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    sys.exit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
