"""MNIST 28x28 (needs the tfds mnist download, so a machine with a network or a prepared data_dir)."""

from . import ddpm as ddpm_config

VARIANTS = ("runlocal",)  # the args get_config accepts (--config=mnist:runlocal)


def get_config(arg: str | None = None):
    config = ddpm_config.get_config(arg)
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.channels = 1
    config.model.attn_resolutions = (14,)  # 28 -> 14 -> (7): ddpm's (4,) is never reached at 28x28
    config.data.validation_size = 2000  # held out of the 60,000 train images (tfds mnist has no validation split)
    if arg != "runlocal":
        config.model.ch = 64
        config.model.ch_mult = (1, 2, 2)
        config.model.num_groups = 32
        config.model.dropout = 0.1
        config.training.num_train_steps = 100_000
        config.training.eval_every = 5000
        config.training.sample_every = 10_000
        config.training.checkpoint_every = 5000
        config.training.ema_decay = 0.9999
        config.optim.lr = 2e-4
        config.optim.warmup_steps = 1000
        config.optim.lr_schedule = "constant"
    return config
