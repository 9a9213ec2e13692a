"""What stops a training run cleanly: a pre-emption signal (SIGTERM / SIGINT), or a run of
non-finite steps; the loop saves a checkpoint in both cases."""

from __future__ import annotations

import signal

import numpy as np

from ddpm_jax.training import distributed


class StopFlag:
    """Set by SIGTERM / SIGINT so the loop can save and exit cleanly (pre-emption).

    A second signal restores the previous handlers and re-raises, so a stuck run can still be
    interrupted (the last complete checkpoint stays).
    """

    def __init__(self):
        self.signal: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, _frame):
        if self.signal is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class NonfiniteGuard:
    """Counts skipped (non-finite) steps in a row from metrics['nonfinite'] without a device sync
    every step.

    The flags are fetched only when the run could have reached the limit since the last look
    (`limit - streak` steps later: every `limit` steps in a healthy run) and at log steps, which
    still stops at exactly the step where the limit is reached.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.pending: list = []  # (step, device flags) not yet looked at
        self.streak, self.first_bad, self.skipped = 0, None, 0

    def add(self, step: int, flags) -> None:
        self.pending.append((step, flags))

    def due(self) -> bool:
        return len(self.pending) >= self.limit - self.streak

    def check(self) -> bool:
        """Looks at the pending flags; True once `limit` steps in a row were skipped."""
        flags = distributed.local_values([f for _, f in self.pending])
        for (step, _), f in zip(self.pending, flags):
            if np.max(f) > 0:
                self.streak, self.skipped = self.streak + 1, self.skipped + 1
                self.first_bad = step if self.streak == 1 else self.first_bad
            else:
                self.streak = 0
        self.pending = []
        return self.streak >= self.limit

    def message(self, config, step: int, where: str) -> str:
        lr = config.optim.lr
        # The networks' compute dtype: the UNet's (config.model) or a VAE's own section's.
        section = next((s for s in ("model", config.get("method", "ddpm")) if "dtype" in config.get(s, {})), None)
        dtype = config[section].dtype if section else "float32"
        causes = [
            f"the learning rate is too high (config.optim.lr={lr:g}; try {lr / 10:g} or a longer "
            "config.optim.warmup_steps)",
            f"overflow in low precision (config.{section}.dtype={dtype!r}; 'float32' is the safe choice)",
            f"bad data (NaN/Inf or wrongly scaled images in dataset {config.data.dataset!r})",
        ]
        if dtype != "float32":
            causes.insert(0, causes.pop(1))
        return (
            f"training stopped at step {step}: {self.streak} steps in a row (steps {self.first_bad} to {step}) had "
            f"a non-finite loss or gradient and were skipped, so the parameters are still those after step "
            f"{self.first_bad - 1}; saved them in {where} (checkpoint step {step}). Likely causes: "
            f"{'; '.join(causes)}. Fix the cause and run the same command again to resume, or raise "
            "config.training.max_nonfinite_steps to tolerate longer runs of bad steps."
        )
