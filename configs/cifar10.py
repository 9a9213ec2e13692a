"""CIFAR-10 as in Ho et al. 2020: the 35.7M-parameter UNet, 800k steps of batch 128, Adam 2e-4.

Only the fields that differ from configs/ddpm.py are set here.
`get_config("runlocal")` keeps the CIFAR data shapes but shrinks the model and the loop for smoke runs.

Hardware variants (`--config=cifar10:h200`, `cifar10:gpu8`, `cifar10:tpu-v4-32`, ...; HARDWARE below)
compute in bfloat16 (float32 params, optimiser state and EMA) and set the global batch for their
device count. At the paper's batch of 128 nothing else changes. A larger batch keeps the paper's
number of training images (800k x 128), so it takes proportionally fewer steps, and its learning
rate grows with the square root of the batch ratio (the square-root rule for Adam; Malladi et al.,
2022), its warm-up shrinks to the same number of images and its EMA decay keeps the same horizon
in images. Those scaled recipes are not validated against the paper's FID; the batch-128 ones are
the paper's recipe.

Splits: tfds cifar10 has no validation split, so 1000 training images (2%) are held out (data/splits.py's
rule) for the curves and any choice; the model trains on the other 49,000 (the paper: all 50,000). keep_best
is off: the paper reports its last step, and a checkpoint chosen by the validation bound favours likelihood
over samples for an L_simple model (and saves 143 MB of EMA params at every improving eval).
"""

import math

import ml_collections

from . import ddpm as ddpm_config

PAPER_BATCH, PAPER_STEPS = 128, 800_000

# variant -> (devices it is sized for: JAX devices, i.e. GPUs or TPU chips; global batch)
HARDWARE = {
    "h100": (1, 128),  # one GPU: the paper's batch
    "h200": (1, 128),
    "gpu8": (8, 512),  # one host with 8 GPUs (A100 / H100 / H200): 64 per GPU
    "tpu-v3-8": (8, 128),  # the paper's machine: 8 TPU v3 cores, 16 per core
    "tpu-v4-8": (4, 128),  # 4 chips (one host)
    "tpu-v4-32": (16, 512),  # 16 chips on 4 hosts, 32 per chip
    "tpu-v5e-8": (8, 256),  # 8 chips (one host)
}
VARIANTS = ("runlocal", *HARDWARE)


def set_hardware(config: ml_collections.ConfigDict, variant: str) -> None:
    """bfloat16 compute and the global batch of HARDWARE[variant], the schedule scaled to it."""
    devices, batch = HARDWARE[variant]
    assert batch % devices == 0, (variant, batch, devices)
    scale = batch / PAPER_BATCH
    config.model.dtype = "bfloat16"
    config.optim.flatten = not variant.startswith("tpu")  # +4% steps/s on an H200 (bench/RESULTS.md, run 5)
    config.training.batch_size = batch
    config.training.num_train_steps = round(PAPER_STEPS / scale)
    config.optim.lr = 2e-4 * math.sqrt(scale)
    config.optim.warmup_steps = round(5000 / scale)
    config.training.ema_decay = 0.9999**scale
    for every in ("eval_every", "sample_every", "checkpoint_every"):
        config.training[every] = round(10_000 / scale)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", *VARIANTS):
        raise ValueError(f"unknown variant {arg!r} of configs/cifar10.py; its variants are {', '.join(VARIANTS)}.")
    config = ddpm_config.get_config()

    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True  # the paper's only augmentation on CIFAR-10
    config.data.validation_size = 1000  # held out of the 50,000 (no tfds validation split); eval cost stays small

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)  # 32, 16, 8, 4
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_groups = 32
    config.optim.flatten = False  # on CPU the flat 143 MB vectors lost (0.87-0.93x); the GPU variants set it

    config.diffusion.schedule = "linear"  # beta from 1e-4 to 0.02
    config.diffusion.num_timesteps = 1000
    config.diffusion.parameterization = "eps"
    config.diffusion.variance = "fixed_large"  # sigma_t^2 = beta_t, the paper's CIFAR-10 choice
    config.diffusion.loss_type = "simple"

    config.training.batch_size = 128
    config.training.bpd_batch_size = 0  # the training batch
    config.training.num_train_steps = 800_000
    config.training.ema_decay = 0.9999
    config.training.log_every = 100
    config.training.eval_every = 10_000
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_best = False  # the paper's protocol: the last step (see the docstring)

    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.lr_schedule = "constant"
    config.optim.grad_clip = 1.0

    if arg == "runlocal":
        ddpm_config.shrink_for_runlocal(config)
    elif arg in HARDWARE:
        set_hardware(config, arg)
    return config
