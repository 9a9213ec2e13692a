"""Timestep samplers: uniform, and Improved DDPM's loss-second-moment importance sampler.

Both return (t, weights) with weights = 1 / (T p_t), so that mean(weights * T * L_t) is an
unbiased estimate of sum_t L_t whatever p is (Nichol & Dhariwal 2021, sec. 3.3). The
importance sampler's loss history is a pytree updated by a pure function, kept in the train
state and checkpointed with it.
"""

from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("uniform", "importance")


@flax.struct.dataclass
class LossHistory:
    """The last K values of the bound term L_t seen at each t: losses [T, K], counts [T]."""

    losses: jnp.ndarray
    counts: jnp.ndarray


def init_loss_history(num_timesteps: int, history_per_term: int = 10) -> LossHistory:
    return LossHistory(
        losses=jnp.zeros((num_timesteps, history_per_term), jnp.float32), counts=jnp.zeros((num_timesteps,), jnp.int32)
    )


def importance_probs(history: LossHistory, uniform_prob: float = 1e-3) -> jnp.ndarray:
    """p_t proportional to sqrt(E[L_t^2]) once every t has K values; uniform until then."""
    num_timesteps, k = history.losses.shape
    weights = jnp.sqrt(jnp.mean(history.losses**2, axis=1))
    probs = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    probs = (1.0 - uniform_prob) * probs + uniform_prob / num_timesteps
    warm = jnp.all(history.counts >= k) & jnp.all(jnp.isfinite(probs)) & (jnp.sum(weights) > 0)
    return jnp.where(warm, probs, jnp.full((num_timesteps,), 1.0 / num_timesteps))


def sample_timesteps(keys: chex.PRNGKey, num_timesteps: int, history: LossHistory | None = None):
    """Draws one t per key ([B] keys, so each example's t depends on its own key only).

    Returns:
      (t [B] int32, weights [B] float32 = 1 / (T p_t)).
    """
    if history is None:
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(keys)
        return t.astype(jnp.int32), jnp.ones(t.shape, jnp.float32)
    probs = importance_probs(history)
    t = jax.vmap(lambda k: jax.random.choice(k, num_timesteps, p=probs))(keys).astype(jnp.int32)
    return t, 1.0 / (num_timesteps * probs[t])


def update_loss_history(history: LossHistory, t: jnp.ndarray, losses: jnp.ndarray) -> LossHistory:
    """Pushes each (t_i, loss_i) into t_i's ring buffer, in batch order (duplicates included)."""
    chex.assert_equal_shape([t, losses])
    k = history.losses.shape[1]

    def push(i, h):
        ti = t[i]
        slot = h.counts[ti] % k
        return LossHistory(
            losses=h.losses.at[ti, slot].set(losses[i].astype(jnp.float32)), counts=h.counts.at[ti].add(1)
        )

    return jax.lax.fori_loop(0, t.shape[0], push, history)
