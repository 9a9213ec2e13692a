"""Shared by the ablation grids: the digits default, shortened so a cell fits a few minutes on 2 CPU cores.

Cells with the same name in different grids are the same run (the runner reuses a finished cell
and refuses a name that two grids define differently), so every grid calls the unchanged
default "default", which is also the cell the others are compared with (ddpm-ablate's paired
differences).
"""

BASE = "ddpm"  # the shipped config of that name (configs/ddpm.py)
OVERRIDES = {"training.num_train_steps": 600, "training.eval_every": 200, "optim.warmup_steps": 50}
DEFAULT_CELL = {}


def grid(cells: dict, base: str = BASE, reference: str | None = None, **overrides) -> dict:
    """A grid of `cells` on `base` with the shared overrides (and these); every cell is compared with
    `reference` (default: the cell "default", else the first). Seeds: `ddpm-ablate --seeds=N`."""
    out = {"base": base, "overrides": {**OVERRIDES, **overrides}, "cells": cells}
    if reference is not None:
        out["reference"] = reference
    return out
