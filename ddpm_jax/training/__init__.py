"""Training: the train state and the pmapped steps (train_lib: TrainState, CompiledSteps), the loop
(loop), checkpoints, the config checks run before a run starts (validation), the stop and NaN guards,
the metric writer, the workdir lock and the multi-device helpers (distributed: replicate /
unreplicate, jax.distributed)."""
