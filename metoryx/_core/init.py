"""How ``init_fn`` makes its arrays: alike variables in one draw, the others one by one.

Drawing each variable with its own call puts one random program per variable into
``jax.jit(init_fn)``: XLA then compiles a 100-layer model ~10x slower than a 3-layer one.
Variables that share an initializer (by ``==``), a shape and a dtype are therefore drawn
together: one ``jax.vmap`` of the initializer over their stacked path-derived keys, split with
``jnp.unstack``. The bits are those of the one-by-one draws (``fold_in`` and JAX's samplers
give the same values batched), so grouping is invisible in ``variables``.

Only initializers that declare ``vectorizable = True`` (see ``metoryx.initializers``) are
grouped: vmap calls a function once, with tracers, so one with Python side effects, one that
is not traceable, or one whose batched form computes differently (a batched QR) must be called
per variable. Fixed values are copied, and a group whose draw fails or returns the wrong shape is
drawn again one by one, so the error names the variable's path exactly as it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.context import BoundVariable
from metoryx._core.paths import path_str
from metoryx._core.rng import fold_in_path, fold_in_paths, path_words

# The most elements drawn in one vmapped call: a group holds its stacked draw and the split
# arrays at once, so a larger one is drawn in several calls to bound that transient memory
# (256 MiB of float32 per call).
MAX_GROUP_ELEMENTS = 1 << 26


class Group(NamedTuple):
    """Variables drawn together: their initializer, shape, dtype, slots and path hashes."""

    init: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    slots: list[int]
    words: np.ndarray


class InitPlan:
    """The order of draws for the variables of a snapshot, for one ``jax_enable_x64`` setting
    (it decides the canonical dtypes, hence the groups)."""

    def __init__(self, variables: list[BoundVariable]):
        self.variables = variables
        alike: dict[tuple[Any, tuple[int, ...], np.dtype], list[int]] = {}
        steps: list[Group | int] = []
        for i, bound in enumerate(variables):
            var = bound.variable
            if var._value is None and getattr(var.init, "vectorizable", False) is True:
                dtype = jax.dtypes.canonicalize_dtype(var.dtype)
                try:
                    alike.setdefault((var.init, var.shape, dtype), []).append(i)
                    continue
                except TypeError:  # an unhashable initializer: drawn alone
                    pass
            steps.append(i)
        for (init, shape, dtype), slots in alike.items():
            per_call = max(MAX_GROUP_ELEMENTS // max(math.prod(shape), 1), 1)
            for start in range(0, len(slots), per_call):
                chunk = slots[start : start + per_call]
                if len(chunk) == 1:
                    steps.append(chunk[0])
                else:
                    words = path_words(variables[j].path for j in chunk)
                    steps.append(Group(init, shape, dtype, chunk, words))
        # In the order of the variables, so that the first failing one is the one reported.
        steps.sort(key=lambda step: step.slots[0] if isinstance(step, Group) else step)
        self.steps = steps

    def draw(self, key: jax.Array) -> list[jax.Array]:
        """The array of every variable, in slot order, from the root ``key``."""
        arrays: list[Any] = [None] * len(self.variables)
        for step in self.steps:
            if isinstance(step, int):
                arrays[step] = init_one(key, self.variables[step])
                continue
            drawn = _draw_group(key, step)
            if drawn is None:
                for i in step.slots:
                    arrays[i] = init_one(key, self.variables[i])
            else:
                for i, array in zip(step.slots, drawn, strict=True):
                    arrays[i] = array
        return arrays


def _draw_group(key: jax.Array, group: Group) -> Sequence[jax.Array] | None:
    """The group's arrays from one vmapped draw, or None when it must be drawn one by one."""
    keys = fold_in_paths(key, group.words)

    def draw(one_key: jax.Array) -> Any:
        return group.init(one_key, group.shape, group.dtype)

    try:
        # Traced, a loop: its boundary keeps XLA from fusing the sampler's arithmetic into the
        # kernel of every output slice, which made those kernels 3x slower to compile on CPU.
        # Eagerly, vmap: each operation is dispatched once for the group, nothing is compiled.
        stacked = lax.map(draw, keys) if isinstance(keys, jax.core.Tracer) else jax.vmap(draw)(keys)
    except Exception:
        return None  # drawn one by one, whose error names the variable
    if not isinstance(stacked, jax.Array) or stacked.shape != (len(group.slots), *group.shape):
        return None
    if stacked.dtype != group.dtype:
        stacked = stacked.astype(group.dtype)
    return jnp.unstack(stacked)


def init_one(key: jax.Array, bound: BoundVariable) -> jax.Array:
    """The array of one variable: a copy of its fixed value, or a draw with its own key."""
    var = bound.variable
    dtype = jax.dtypes.canonicalize_dtype(var.dtype)
    if var._value is not None:
        # A copy: the caller owns what init_fn returns and may donate or delete it, which
        # must not destroy the model's fixed value (often the user's own array).
        return jnp.array(var._value, dtype=dtype, copy=True)
    try:
        value = var.init(fold_in_path(key, bound.path), var.shape, dtype)
    except Exception as e:
        e.add_note(f"(raised by the initializer of {path_str(bound.path)}: {var!r})")
        raise
    if not isinstance(value, jax.Array):
        value = jnp.asarray(value)
    if value.shape != var.shape:
        raise errors.VariableShapeError(
            f"{path_str(bound.path)}: its initializer {var.init!r} returned shape "
            f"{value.shape}, expected {var.shape}. An initializer must honor the `shape` "
            f"it is given."
        )
    return value if value.dtype == dtype else jnp.asarray(value, dtype=dtype)
