"""Shared by test_faults / test_errors / test_distributed: a micro config, its command-line twin,
and real train.py / sample.py subprocesses that share one compilation cache.

Compiling the train step dominates on 2 shared CPU cores (minutes for the runlocal UNet), so
these tests use a one-level UNet without attention; in-process runs of the micro config share
one set of compiled steps (conftest's `steps_for`), and the subprocesses run with
JAX_DISABLE_MOST_OPTIMIZATIONS and a persistent compilation cache: the first subprocess
compiles, the next ones load its executables.
"""

import json
import os
import signal
import subprocess
import sys
import time

from ddpm_jax import configuration
from ddpm_jax.configs import ddpm as ddpm_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

# Everything but the device count is fixed here, so in-process tests that build the same config
# (with the session's data_dir) share compiled steps through conftest's `steps_for`.
MICRO = {
    "model.ch_mult": (1,),
    "model.attn_resolutions": (),
    "training.final_bpd": False,
    "training.num_train_steps": 12,
    "training.eval_every": 1000,
    "training.sample_every": 1000,
    "training.max_nonfinite_steps": 3,
}


def micro_config(data_dir=None, **overrides):
    """runlocal with a one-level, attention-free UNet; overrides use dotted names."""
    config = ddpm_config.get_config("runlocal")
    for k, v in {**MICRO, **overrides}.items():
        configuration.set_field(config, k, v)
    config.data.data_dir = data_dir
    return config


def _flag(value) -> str:
    if isinstance(value, tuple):
        return "(" + "".join(f"{v}," for v in value) + ")"
    return str(value)


def micro_flags(**overrides) -> list:
    """The command-line form of micro_config (the data_dir goes through TFDS_DATA_DIR)."""
    merged = {**MICRO, **overrides}
    return ["--config=configs/ddpm.py:runlocal"] + [f"--config.{k}={_flag(v)}" for k, v in merged.items()]


def env(base_dir: str, data_dir: str, devices: int = 2) -> dict:
    """Environment for a train.py / sample.py subprocess with `devices` forced CPU devices."""
    out = dict(os.environ)
    out.update(
        {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
            "JAX_COMPILATION_CACHE_DIR": os.path.join(base_dir, "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "TFDS_DATA_DIR": data_dir,
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    return out


def start(script: str, args: list, env_: dict, log_path: str) -> subprocess.Popen:
    """Starts `python script args` in the repo root, stdout + stderr into log_path."""
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, script] + args, cwd=ROOT, env=env_, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def run(script: str, args: list, env_: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script] + args, cwd=ROOT, env=env_, capture_output=True, text=True, timeout=timeout
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, poll: float = 0.02, what: str = ""):
    """Polls predicate() until it returns something truthy; fails if proc exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the process exited (rc {proc.returncode}) before {what}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def committed_steps(workdir: str) -> list:
    """Steps of the complete checkpoints (Orbax's final folders; tmp folders are not steps)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def tmp_checkpoints(workdir: str) -> list:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return [n for n in os.listdir(path) if "orbax-checkpoint-tmp" in n]


def logged_step(workdir: str) -> int:
    """The last step in metrics.jsonl (0 if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    step = 0
    with open(path) as f:
        for line in f:
            try:
                step = max(step, json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return step


def kill(proc: subprocess.Popen, sig=signal.SIGKILL, timeout: float = 120) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)
