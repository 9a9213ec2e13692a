"""Training: the train state and the pmapped steps (train_lib), the loop (loop), checkpoints, the
config checks run before a run starts (validation), the stop and NaN guards, the metric writer, the
workdir lock and the multi-host helpers."""
