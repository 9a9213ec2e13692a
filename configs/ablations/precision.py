"""Mixed precision: bfloat16 compute (float32 params, optimiser and EMA) against float32, on the digits.

"seed1" is float32 with another seed: the gap between the two float32 runs is the noise that the
bf16 run's gap to float32 is compared against (one more seed; `ddpm-ablate --grid=precision --seeds=3`
now trains every cell with several seeds and pairs bf16 with float32 seed by seed).
"""

from ._common import DEFAULT_CELL, grid


def get_grid():
    return grid({"default": DEFAULT_CELL, "seed1": {"seed": 1}, "bf16": {"model.dtype": "bfloat16"}})
