"""The pure core: functions of arrays, keys and schedules (no I/O, no config, no global state).

Schedules, the discrete chain's q_sample / posterior / every term of the bound, its samplers and t
samplers, continuous-time VDM, the VAE and hierarchical VAE bounds, the probability-flow ODE
likelihood, the Fréchet distance and the pixel-histogram baseline. It imports nothing of ddpm_jax
outside core/ (tests/test_architecture.py checks it).
"""
