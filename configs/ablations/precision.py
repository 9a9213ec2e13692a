"""Mixed precision: bfloat16 compute (float32 params, optimiser and EMA) against float32, on the digits."""

from configs.ablations._common import DEFAULT_CELL, grid


def get_grid():
    return grid({"default": DEFAULT_CELL,
                 "bf16": {"model.dtype": "bfloat16"}})
