"""CIFAR-10 as in Ho et al. 2020: the 35.7M-parameter UNet, 800k steps of batch 128, Adam 2e-4.

Only the fields that differ from configs/ddpm.py are set here.
`get_config("runlocal")` keeps the CIFAR data shapes but shrinks the model and the loop for smoke runs.
"""

import ml_collections

from configs import ddpm as ddpm_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ddpm_config.get_config()

    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True  # the paper's only augmentation on CIFAR-10

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)  # 32, 16, 8, 4
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_groups = 32

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

    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.lr_schedule = "constant"
    config.optim.grad_clip = 1.0

    if arg == "runlocal":
        ddpm_config.shrink_for_runlocal(config)
    return config
