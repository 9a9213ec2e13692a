"""Evaluation of a run: the test loss and bound, and the end-of-run report built from small
evaluators (report), drawing samples on every device and sample.py's library half (sample_lib), the
probability-flow ODE NLL over a run's images (ode_eval), the digits classifier's sample metrics
(digits_classifier) and the pictures (plots)."""
