"""Default config: the offline 8x8 digits, a small UNet, trains on 2 CPU cores in minutes.

Override any field from the command line, e.g. `python train.py --config.optim.lr=1e-4`.
`get_config("runlocal")` shrinks everything for tests and smoke runs.
"""

import ml_collections

VARIANTS = ("runlocal",)  # the args get_config accepts (--config=ddpm:runlocal)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.method = "ddpm"  # or "vae": the baseline of configs/vae.py

    config.data = ml_collections.ConfigDict()
    # Any tfds image dataset ("digits" is the offline sklearn set) or "folder:/path/to/images" (PNG/JPEG);
    # images are centre-cropped and resized to image_size (ddpm_jax/data/images.py).
    config.data.dataset = "digits"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir; None = tfds default
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.data.train_split = "train"
    config.data.eval_split = "test"  # the test split: read once, by the final report of the chosen params
    # The validation split, on which every choice is made (curves, keep_best, ddpm-ablate's best, the sampler):
    # "holdout" holds a fixed subset of train_split out (data/splits.py: its rule, seeded by HOLDOUT_SEED, not
    # config.seed), or the name of a split of the dataset (then train_split is used whole).
    config.data.validation_split = "holdout"
    config.data.validation_size = 0.1  # the holdout: a fraction in (0, 1) or a number of images (digits: 150 of 1500)
    # False: stream the splits from disk by index (folders; tfds datasets prepared as ArrayRecord), with the
    # same (seed, step)-determined batches and exact resume as in memory.
    config.data.in_memory = True

    config.model = ml_collections.ConfigDict()
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.num_groups = 8  # GroupNorm groups (the paper uses 32 with ch=128)
    config.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.parameterization = "eps"
    config.diffusion.variance = "fixed_small"
    config.diffusion.loss_type = "simple"
    config.diffusion.timestep_sampler = "uniform"  # or "importance" (Improved DDPM, for vlb)
    config.diffusion.learned_init = "linear"  # schedule="learned" starts at this schedule's log-SNR endpoints
    # "learned": the t = 0 decoder's log std is a parameter (per channel), started at the fixed value and trained
    # by L_0 on decoder_batch examples per device at t = 0 on every step (mean stop-gradiented; one extra forward).
    config.diffusion.decoder = "fixed"
    config.diffusion.decoder_batch = 16
    config.diffusion.prior_loss = (
        False  # True: the prior L_T joins the loss (a learned schedule: the loss is the bound)
    )
    config.diffusion.condition_on = "index"  # or "log_snr": the network sees log SNR_t mapped onto [0, T - 1]
    # With loss_type "vlb" / "weighted": the weight w_t of each term L_{t-1}, t >= 1 (diffusion.chain_weights, the
    # discrete form of core/weighting.py): "elbo" (1: the bound), "eps", "x0", "v" (those predictors' MSE exactly),
    # "simple", "sigmoid", "edm"; mean 1 over t. The reported bound is the ELBO whatever it is.
    config.diffusion.weighting = "elbo"
    config.diffusion.weighting_bias = -2.0  # b of "sigmoid"

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # global, split over all devices
    config.training.num_train_steps = 1000
    config.training.ema_decay = 0.998
    config.training.log_every = 50
    config.training.eval_every = 500  # the validation split's loss and bound estimate (val_*)
    # Keep the EMA params of the eval step with the lowest validation bound estimate (val_bpd_est; loop.SELECT_BY)
    # in <workdir>/best; the final report (samples, test bound) uses them. False: the last step's.
    config.training.keep_best = True
    config.training.sample_every = (
        100000  # intermediate sample grids (PNG) from EMA params; the final one is always drawn
    )
    config.training.checkpoint_every = 500
    config.training.keep_checkpoints = 3
    # FID, IS and KID of fid_num_samples EMA samples (the default sampler) against the train split every fid_every
    # steps and at the end; 0: off. Needs the FID Inception weights ($DDPM_JAX_INCEPTION_WEIGHTS; ddpm_jax.fid).
    config.training.fid_every = 0
    config.training.fid_num_samples = 10_000
    config.training.final_bpd = True  # the test bound in bits/dim at the end
    # 0: all T terms (T network calls per test image: ~4 min here); > 0: the unbiased stratified estimate
    # over t with this many strata (diffusion.bpd_estimate). The exact one: python -m ddpm_jax.evaluate.
    config.training.final_bpd_strata = 100
    config.training.bpd_batch_size = 300  # final bound's batch (0: batch_size); 300 = all 297 test digits at once
    config.training.bpd_estimate_strata = 20  # val_bpd_est at eval_every: the bound from 20 strata of t
    config.training.max_nonfinite_steps = 10  # stop (with a checkpoint) after this many skipped NaN/Inf steps in a row

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    config.optim.lr_schedule = "cosine"  # "constant" (the paper) or "cosine" decay after warm-up
    config.optim.grad_clip = 1.0
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.999
    config.optim.eps = 1e-8
    # True: params, EMA params and Adam's moments as one vector each (train_lib.TrainState.to_flat): the same update
    # in ~2.4x fewer ops, and the digits step compiles in 7 s instead of 25-33 s at the same step time (the main job
    # reaches step 50 in 14-16 s instead of 29-32, cold; its bound is unchanged within se; bench/RESULTS.md).
    # Checkpoints hold the tree form either way. cifar10 keeps it off on CPU (35.7M parameters: vectors far beyond
    # the cache, 0.87-0.93x).
    config.optim.flatten = True

    config.sampling = ml_collections.ConfigDict()
    config.sampling.num_samples = 64
    config.sampling.clip_denoised = True

    if arg == "runlocal":
        shrink_for_runlocal(config)
    return config


def shrink_for_runlocal(config: ml_collections.ConfigDict) -> None:
    """A tiny model and loop (tests, smoke runs); keeps the data shapes."""
    config.model.ch = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.num_groups = 4
    config.diffusion.num_timesteps = 20
    config.training.batch_size = 8
    config.training.bpd_batch_size = 0
    config.training.final_bpd_strata = 0
    config.training.num_train_steps = 4
    config.training.log_every = 2
    config.training.eval_every = 4
    config.training.sample_every = 4
    config.training.checkpoint_every = 2
    config.optim.warmup_steps = 2
    config.sampling.num_samples = 8
