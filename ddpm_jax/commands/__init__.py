"""The console commands (`ddpm-train`, `ddpm-sample`; `ddpm-evaluate` and `ddpm-ablate` are
ddpm_jax.commands.evaluate and ddpm_jax.commands.ablate). Each module's `define_flags()` defines its absl flags and
returns its `main`; `cli_main()` is the console entry point. train.py and sample.py at the repo root
are thin wrappers over the same functions."""
