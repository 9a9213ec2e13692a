"""A flat train state: params, EMA params and the optimizer's moments as one vector each (`optim.flatten`).

The UNets' ~200 parameter leaves make the optimizer, the EMA and the NaN guard ~1,000 small kernels a
step when they run leaf by leaf (bench/RESULTS.md, "What limits the digits step"). Over one vector of
all parameters they are a handful. The loss still sees the parameter tree: `FlatLayout.unravel` is a
static split + reshape (jnp.split, whose transpose is one concatenate), so the gradient comes out flat.

Checkpoints always hold the tree form (`to_tree`), the per-leaf optimizer's state by name, so a run
resumes with or without `optim.flatten` whichever way it was started (`to_flat` converts back).
Both conversions accept arrays with leading axes (a replicated state's device axis) and keep NumPy
leaves NumPy (views, no copy), so a host state is converted for free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each parameter leaf lives in the flat vector: the tree's structure, the leaves' shapes in
    `tree_leaves` order, and their one dtype. Hashable: a static field of the train state."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @classmethod
    def of(cls, params) -> FlatLayout:
        """The layout of a parameter tree (arrays or jax.ShapeDtypeStructs, no leading axes).

        Raises:
          ConfigError: the leaves do not share one dtype (one vector cannot hold them).
        """
        leaves, treedef = jax.tree_util.tree_flatten(params)
        dtypes = sorted({str(np.dtype(x.dtype)) for x in leaves})
        if len(dtypes) != 1:
            raise ConfigError(
                f"optim.flatten=True keeps all parameters in one vector, but they have the dtypes {dtypes}: "
                "set --config.optim.flatten=False for this model."
            )
        return cls(treedef, tuple(tuple(int(d) for d in np.shape(x)) for x in leaves), dtypes[0])

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def abstract_tree(self):
        """The parameter tree as jax.ShapeDtypeStructs."""
        return self.treedef.unflatten([jax.ShapeDtypeStruct(s, self.dtype) for s in self.shapes])

    def is_tree(self, x) -> bool:
        """Whether x is a parameter-shaped tree of this layout (what `unravel` returns, leading axes allowed)."""
        leaves, treedef = jax.tree_util.tree_flatten(x)
        if treedef != self.treedef:
            return False
        return all(tuple(np.shape(v))[np.ndim(v) - len(s) :] == s for v, s in zip(leaves, self.shapes, strict=True))

    def ravel(self, tree):
        """[..., size]: the leaves (with the same leading axes) concatenated in `tree_leaves` order."""
        leaves = self.treedef.flatten_up_to(tree)
        lead = tuple(np.shape(leaves[0]))[: np.ndim(leaves[0]) - len(self.shapes[0])]
        xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
        return xp.concatenate([xp.reshape(x, lead + (-1,)) for x in leaves], axis=-1)

    def unravel(self, flat):
        """The parameter tree of a [..., size] vector: a split at static offsets and reshapes (views for NumPy)."""
        xp = np if isinstance(flat, np.ndarray) else jnp
        lead = tuple(np.shape(flat))[:-1]
        if np.shape(flat)[-1] != self.size:
            raise ValueError(f"a flat vector of {np.shape(flat)[-1]} values for a layout of {self.size}")
        parts = xp.split(flat, np.cumsum(self.sizes)[:-1].tolist(), axis=-1)
        return self.treedef.unflatten([xp.reshape(p, lead + s) for p, s in zip(parts, self.shapes, strict=True)])


def flat_opt_state(tx, layout: FlatLayout, opt_state):
    """The optimizer state of a tree `opt_state` (the per-leaf optimizer's) over the flat vector: every
    parameter-shaped subtree (Adam's mu, nu) raveled, counts and the like kept. The flat state's structure
    is a prefix of the tree state's, so one tree_map pairs them."""
    flat_ref = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((layout.size,), layout.dtype))
    return jax.tree_util.tree_map(
        lambda ref, sub: layout.ravel(sub) if layout.is_tree(sub) and ref.shape == (layout.size,) else sub,
        flat_ref,
        opt_state,
    )


def tree_opt_state(tx, layout: FlatLayout, opt_state):
    """The inverse of `flat_opt_state`: the per-leaf optimizer's state, by name."""
    tree_ref = jax.eval_shape(tx.init, layout.abstract_tree())
    return jax.tree_util.tree_map(
        lambda flat, ref: (
            layout.unravel(flat) if layout.is_tree(ref) and np.shape(flat)[-1:] == (layout.size,) else flat
        ),
        opt_state,
        tree_ref,
    )


def to_flat(state):
    """A tree train state (unreplicated) as a flat one: params, EMA params and the optimizer's
    parameter-shaped state raveled, `layout` set. A flat state is returned as it is."""
    if state.layout is not None:
        return state
    layout = FlatLayout.of(state.params)
    return state.replace(
        params=layout.ravel(state.params),
        ema_params=layout.ravel(state.ema_params),
        opt_state=flat_opt_state(state.tx, layout, state.opt_state),
        layout=layout,
    )


def to_tree(state):
    """A flat train state (unreplicated or replicated) as the tree one, the form checkpoints hold;
    a tree state is returned as it is."""
    layout = state.layout
    if layout is None:
        return state
    return state.replace(
        params=layout.unravel(state.params),
        ema_params=layout.unravel(state.ema_params),
        opt_state=tree_opt_state(state.tx, layout, state.opt_state),
        layout=None,
    )


def optax_flatten_target(target):
    """The restore target of a checkpoint written with `optim.flatten` before the flat state (issue 24),
    when the optimizer was optax.flatten(tx): the tree state, but Adam's moments as flat vectors."""
    layout = FlatLayout.of(target.params)
    return target.replace(opt_state=jax.eval_shape(target.tx.init, jax.ShapeDtypeStruct((layout.size,), layout.dtype)))


def from_optax_flatten(state):
    """A state restored into `optax_flatten_target` as the tree state checkpoints now hold."""
    return state.replace(opt_state=tree_opt_state(state.tx, FlatLayout.of(state.params), state.opt_state))
