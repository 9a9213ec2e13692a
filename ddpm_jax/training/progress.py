"""Progress on the console: tqdm's bar on a terminal, plain lines in a file.

A bar redraws itself with carriage returns, which a file (a SLURM log, nohup.out, a CI log) keeps
as thousands of frames on one line. So the console mode is read once, from `is_terminal()`: on a
terminal (or in a Jupyter notebook) the loop shows tqdm's bar; otherwise it prints one plain line
per log step (`step 50/1500  loss 0.0423  2.81 steps/s  elapsed 0:00:36  ETA 0:08:36`) and nothing
in between. Tests pick a mode by monkeypatching `is_terminal`, or pass `terminal=` to `Progress`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from tqdm.auto import tqdm


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _in_notebook() -> bool:
    """True in a Jupyter kernel, where tqdm.auto draws a widget rather than carriage returns."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def is_terminal() -> bool:
    """Whether progress can redraw itself: stdout and stderr both a terminal, or a notebook.

    False for a file or a pipe (`> log.txt 2>&1`, SLURM, nohup, CI, pytest's capture): then progress
    is plain lines on stdout, with no carriage returns.
    """
    return (_isatty(sys.stdout) and _isatty(sys.stderr)) or _in_notebook()


def _clock(seconds: float) -> str:
    """0:08:36 (h:mm:ss); '?' for an unknown or infinite time."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """The training loop's progress over `total` steps, starting at `initial`.

    update(n) after each step; log(step, scalars) at each log step (the bar's postfix, or one line with
    step/total, loss, steps/s, elapsed time and ETA); write(message) for a notice (above the bar, or a
    line); close() at the end. With enabled=False (processes other than 0) it shows nothing.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        unit: str = "step",
        enabled: bool = True,
        terminal: bool | None = None,
    ):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.terminal = is_terminal() if terminal is None else terminal
        self.start = time.time()
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
            if self.terminal
            else None
        )

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def line(self, step: int, scalars: dict) -> str:
        """The plain line of a log step (also what a file shows for it)."""
        rate = scalars.get("steps_per_sec", 0.0)
        parts = [f"{self.desc} step {step}/{self.total}"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        parts += [
            f"{rate:.2f} steps/s",
            f"elapsed {_clock(time.time() - self.start)}",
            f"ETA {_clock((self.total - step) / rate) if rate > 0 else '?'}",
        ]
        return "  ".join(parts)

    def log(self, step: int, scalars: dict) -> None:
        if self.bar is not None:
            postfix = {"steps_s": f"{scalars.get('steps_per_sec', 0.0):.2f}"}
            if "loss" in scalars:
                postfix = {"loss": f"{scalars['loss']:.4f}", **postfix}
            self.bar.set_postfix(postfix)
        elif self.enabled:
            print(self.line(step, scalars), flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def iterate(items: Iterable, desc: str, unit: str, enabled: bool = True, terminal: bool | None = None) -> Iterable:
    """`items` with a bar on a terminal (`tqdm(items)`), else as they are after one line
    `<desc>: <n> <unit>s` (a file gets no frames). Reads `items` into a list first."""
    items = list(items)
    if is_terminal() if terminal is None else terminal:
        return tqdm(items, desc=desc, unit=unit, disable=not enabled)
    if enabled:
        print(f"{desc}: {len(items)} {_plural(unit, len(items))}", flush=True)
    return items
