"""Evaluation of a run: the end-of-run report (report), drawing sample grids on every device
(sample_lib), the probability-flow ODE NLL over a run's images (ode_eval), the digits classifier's
sample metrics (digits_classifier) and the pictures (plots)."""
