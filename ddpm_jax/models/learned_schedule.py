"""A learned noise schedule (the lecture's first option; VDM's monotone network, Kingma et al. 2021).

gamma(tau) = -log SNR(tau) on tau in (0, 1] is monotone increasing by construction:

    gamma(tau) = gamma_0 + (gamma_1 - gamma_0) * (g(tau) - g(0)) / (g(1) - g(0)),
    g(tau) = l1(tau) + l3(phi(l2(l1(tau)))),

with non-negative weights in l1, l2, l3 (softplus of free parameters), phi a sigmoid, and
gamma_1 = gamma_0 + softplus(.) > gamma_0. Step t = 0..T-1 of the discrete chain sits at
tau = (t + 1) / T. The parameters live beside the UNet's in the train state, so they are
optimised, averaged by the EMA and checkpointed with it; the exact bound (loss_type 'vlb')
is what trains them.

`DiffusionModel` holds the network with what is learned beside it: the schedule, and the t = 0
decoder's log-scale (config.diffusion.decoder = "learned", with a fixed or a learned schedule).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.core import schedules

LEARNED = "learned"  # the config.diffusion.schedule value that selects it


def _inverse_softplus(y: float) -> float:
    return float(np.log(np.expm1(y)))


class _PositiveDense(nn.Module):
    """Dense layer with weights softplus(w) >= 0: a monotone map of its input."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        raw = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        y = x @ jax.nn.softplus(raw)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class MonotoneGamma(nn.Module):
    """gamma(tau) = -log SNR(tau), increasing in tau; initialised with endpoints gamma_0 < gamma_1."""

    gamma_0: float
    gamma_1: float
    hidden: int = 64

    @nn.compact
    def __call__(self, tau: jnp.ndarray) -> jnp.ndarray:
        l1, l2, l3 = _PositiveDense(1), _PositiveDense(self.hidden), _PositiveDense(1, use_bias=False)

        def g(x):  # [N] -> [N], monotone
            h = l1(x[:, None])
            return (h + l3(2.0 * (nn.sigmoid(l2(h)) - 0.5)))[:, 0]

        g_ends = g(jnp.array([0.0, 1.0]))
        g_tau = g(tau)
        start = self.param("gamma_0", nn.initializers.constant(self.gamma_0), ())
        span_raw = self.param(
            "gamma_span", nn.initializers.constant(_inverse_softplus(self.gamma_1 - self.gamma_0)), ()
        )
        return start + jax.nn.softplus(span_raw) * (g_tau - g_ends[0]) / (g_ends[1] - g_ends[0])


def initial_gamma_range(num_timesteps: int, init_schedule: str = "linear") -> tuple[float, float]:
    """-log SNR at the first and last step of a fixed schedule: where the learned one starts."""
    abar = np.asarray(schedules.make_schedule(init_schedule, num_timesteps).alphas_cumprod, np.float64)
    gamma = np.log1p(-abar) - np.log(abar)
    return float(gamma[0]), float(gamma[-1])


DECODER_PARAM = "decoder_log_scale"  # the learned t = 0 decoder's parameter, beside "network" (and "gamma")
# The decoder's log std is DECODER_RATE * param: Adam moves a parameter by about lr per step, and the
# log-scale must move by ~1 (a factor e) within a few hundred steps at lr 1e-3. A power of two, so that
# the initial value (today's decoder, divided by it) comes back exactly.
DECODER_RATE = 16.0


class DiffusionModel(nn.Module):
    """The score network plus what a DDPM may learn beside it.

    `__call__` is the network's. With gamma_0 and gamma_1 set, a learned schedule (`log_snr`; its
    parameters under "gamma"); with decoder_channels > 0, the t = 0 decoder's learned log std per
    channel (`decoder_log_scale`; its parameter DECODER_PARAM, initialised by the method).
    """

    network: nn.Module
    num_timesteps: int
    gamma_0: float | None = None
    gamma_1: float | None = None
    decoder_channels: int = 0

    def setup(self):
        if self.gamma_0 is not None:
            self.gamma = MonotoneGamma(self.gamma_0, self.gamma_1)
        if self.decoder_channels:
            self.decoder_param = self.param(DECODER_PARAM, nn.initializers.zeros, (self.decoder_channels,))

    def __call__(self, x, t, train: bool = False):
        return self.network(x, t, train=train)

    def log_snr(self) -> jnp.ndarray:
        """log SNR_t for t = 0..T-1 (strictly decreasing)."""
        tau = (jnp.arange(self.num_timesteps, dtype=jnp.float32) + 1.0) / self.num_timesteps
        return -self.gamma(tau)

    def decoder_log_scale(self) -> jnp.ndarray:
        """[C] the t = 0 decoder's log standard deviation."""
        return DECODER_RATE * self.decoder_param

    def init_all(self, x, t):
        """Touches every part so `init` creates every parameter."""
        out = [self(x, t)]
        if self.gamma_0 is not None:
            out.append(self.log_snr())
        if self.decoder_channels:
            out.append(self.decoder_log_scale())
        return tuple(out)


LearnedScheduleModel = DiffusionModel  # the learned schedule's model: DiffusionModel(network, T, gamma_0, gamma_1)


def decoder_param_value(log_scale) -> jnp.ndarray:
    """The DECODER_PARAM value whose decoder log std is `log_scale` (exact: DECODER_RATE is a power of 2)."""
    return jnp.asarray(log_scale) / DECODER_RATE


def schedule_from_params(apply_fn, params) -> schedules.Schedule:
    """The learned VP Schedule these params define (traceable: gradients flow into the params)."""
    return schedules.vp_schedule_from_log_snr(apply_fn({"params": params}, method="log_snr"))
