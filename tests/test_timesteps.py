"""Timestep samplers (ddpm_jax.core.timesteps) against independent NumPy implementations of their docstrings.

The importance sampler (Nichol & Dhariwal 2021, sec. 3.3) draws t with p_t proportional to
sqrt(E[L_t^2]) over the last K losses seen at t (mixed with 1e-3 of uniform), once every t has K
values, and weights each draw by w_t = 1 / (T p_t), so that E_p[w(t) L(t)] = mean_t L(t) for any L.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.core import timesteps

T, K = 10, 4
UNIFORM_PROB = 1e-3
N_DRAWS = 40000
N_SE = 4


def np_probs(losses, counts):
    """p_t of the docstring: uniform until every t has K values (or while all losses are 0)."""
    losses = np.asarray(losses, np.float64)
    rms = np.sqrt((losses**2).mean(axis=1))
    if (np.asarray(counts) < losses.shape[1]).any() or rms.sum() == 0:
        return np.full(losses.shape[0], 1.0 / losses.shape[0])
    return (1 - UNIFORM_PROB) * rms / rms.sum() + UNIFORM_PROB / losses.shape[0]


def np_push(losses, counts, t, values):
    """Each (t_i, value_i) in batch order into t_i's ring buffer of K slots."""
    losses, counts = np.array(losses, np.float32), np.array(counts, np.int64)
    for ti, vi in zip(t, values):
        losses[ti, counts[ti] % losses.shape[1]] = vi
        counts[ti] += 1
    return losses, counts


def warm_history(seed=0):
    """A history whose every t has K losses, of very different sizes across t (as the VLB terms)."""
    rng = np.random.default_rng(seed)
    scale = np.geomspace(0.05, 20.0, T)
    losses = scale[:, None] * rng.uniform(0.5, 1.5, size=(T, K))
    return timesteps.LossHistory(losses=jnp.asarray(losses, jnp.float32), counts=jnp.full((T,), K, jnp.int32))


_sample = jax.jit(timesteps.sample_timesteps, static_argnums=1)


def draws(history, n=N_DRAWS, seed=0):
    t, w = _sample(jax.random.split(jax.random.PRNGKey(seed), n), T, history)
    return np.asarray(t), np.asarray(w, np.float64)


# ----------------------------------------------------------------------------- the loss history


def test_update_loss_history_is_a_ring_buffer_per_t():
    rng = np.random.default_rng(0)
    history = timesteps.init_loss_history(T, K)
    np.testing.assert_array_equal(history.losses, np.zeros((T, K)))
    np.testing.assert_array_equal(history.counts, np.zeros(T))
    ref_losses, ref_counts = np.zeros((T, K), np.float32), np.zeros(T, np.int64)
    pushed = {t: [] for t in range(T)}
    update = jax.jit(timesteps.update_loss_history)
    for step in range(6):
        # t concentrated on a few values: duplicates within a batch, and more than K pushes for some t.
        t = rng.choice(T, size=8, p=np.r_[0.4, 0.3, np.full(T - 2, 0.3 / (T - 2))]).astype(np.int32)
        values = rng.normal(size=8).astype(np.float32) + step
        history = update(history, jnp.asarray(t), jnp.asarray(values))
        ref_losses, ref_counts = np_push(ref_losses, ref_counts, t, values)
        np.testing.assert_array_equal(history.losses, ref_losses)
        np.testing.assert_array_equal(history.counts, ref_counts)
        for ti, vi in zip(t, values):
            pushed[int(ti)].append(vi)
    assert max(len(v) for v in pushed.values()) > 2 * K  # the buffers wrapped around
    for ti, values in pushed.items():  # what the buffer holds: the last K values seen at t, as a set
        kept = np.sort(np.asarray(history.losses[ti])[: min(len(values), K)])
        np.testing.assert_array_equal(kept, np.sort(np.asarray(values[-K:], np.float32)))
        assert int(history.counts[ti]) == len(values)


# ----------------------------------------------------------------------------- the probabilities


def test_importance_probs_are_uniform_until_every_t_has_k_values():
    history = warm_history()
    cold = history.replace(counts=history.counts.at[3].set(K - 1))
    np.testing.assert_allclose(timesteps.importance_probs(cold), np.full(T, 1 / T), rtol=1e-6)
    zero = history.replace(losses=jnp.zeros((T, K)))
    np.testing.assert_allclose(timesteps.importance_probs(zero), np.full(T, 1 / T), rtol=1e-6)
    probs = np.asarray(timesteps.importance_probs(history), np.float64)
    np.testing.assert_allclose(probs, np_probs(history.losses, history.counts), rtol=1e-5)
    assert probs.max() / probs.min() > 100  # far from uniform: the test above can tell them apart
    _, w = draws(cold, n=64)
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)  # uniform p: every weight 1 / (T / T)


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("warm", [False, True])
def test_weights_are_one_over_t_p_and_unbiased_exactly(warm):
    history = warm_history() if warm else None
    p = np_probs(history.losses, history.counts) if warm else np.full(T, 1 / T)
    t, w = draws(history)
    assert set(t) == set(range(T))  # every t drawn, so every weight is seen
    weight = np.empty(T)
    for ti in range(T):  # one weight per t, 1 / (T p_t)
        np.testing.assert_allclose(w[t == ti], 1 / (T * p[ti]), rtol=1e-5)
        weight[ti] = w[t == ti][0]
    # E_p[w(t) L(t)] = sum_t p_t w_t L_t = mean_t L(t), for any L (here one unrelated to the history).
    loss = np.random.default_rng(1).uniform(0.0, 5.0, size=T) ** 2
    np.testing.assert_allclose(np.sum(p * weight * loss), loss.mean(), rtol=1e-5)


@pytest.mark.parametrize("warm", [False, True])
def test_draws_follow_p_and_the_estimate_is_unbiased_by_monte_carlo(warm):
    history = warm_history() if warm else None
    p = np_probs(history.losses, history.counts) if warm else np.full(T, 1 / T)
    t, w = draws(history, seed=1)
    # Each t's frequency within N_SE binomial standard errors of p_t.
    freq = np.bincount(t, minlength=T) / N_DRAWS
    np.testing.assert_array_less(np.abs(freq - p), N_SE * np.sqrt(p * (1 - p) / N_DRAWS) + 1 / N_DRAWS)
    # The estimate mean_i w(t_i) L(t_i) of mean_t L(t), within N_SE of its exact standard error.
    rms = np.sqrt(np.mean(np.asarray(warm_history().losses, np.float64) ** 2, axis=1))
    for loss in (rms, np.random.default_rng(1).uniform(0.0, 5.0, size=T) ** 2):
        est = w * loss[t]
        var = np.sum(p * (loss / (T * p)) ** 2) - loss.mean() ** 2
        assert abs(est.mean() - loss.mean()) < N_SE * np.sqrt(var / N_DRAWS), (est.mean(), loss.mean())
    # Where L is the history's own rms, importance sampling beats uniform (the point of it), by far.
    var_uniform = np.var(rms)
    var_p = np.sum(p * (rms / (T * p)) ** 2) - rms.mean() ** 2
    assert (var_p < var_uniform / 10) if warm else np.isclose(var_p, var_uniform)


def test_each_t_depends_on_its_own_key_only():
    keys = jax.random.split(jax.random.PRNGKey(2), 256)
    for history in (None, warm_history()):
        t_all, w_all = _sample(keys, T, history)
        t_part, w_part = _sample(keys[100:164], T, history)
        np.testing.assert_array_equal(t_part, t_all[100:164])
        np.testing.assert_array_equal(w_part, w_all[100:164])
