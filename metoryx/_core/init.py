"""How ``init_fn`` makes its arrays: alike variables in one draw, the others one by one.

Drawing each variable with its own call puts one random program per variable into
``jax.jit(init_fn)``: XLA then compiles a 100-layer model ~10x slower than a 3-layer one.
Variables that share an initializer (by ``==``), a shape and a dtype are therefore drawn
together: one ``jax.vmap`` of the initializer over their stacked path-derived keys, split
into the variables by slices, or under a trace by gathers that XLA compiles as one kernel for
the whole group (``_split``). Each draw keeps its key and the initializer's operations, so it
is the one-by-one draw; its bits are too wherever the compiler cannot round the two kernels
differently, which the uniform initializers guarantee and the normal ones do not (a fused
multiply-add XLA:CPU makes in one kernel and not in the other: ``Initializer`` in
``metoryx.initializers`` states the bound).

Only initializers that declare ``vectorizable = True`` (see ``metoryx.initializers``) are
grouped: vmap calls a function once, with tracers, so one with Python side effects, one that
is not traceable, or one whose batched form computes differently (a batched QR) must be called
per variable. Fixed values are copied, and a group whose draw fails or returns the wrong shape is
drawn again one by one, so the error names the variable's path exactly as it would alone.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.context import BoundVariable
from metoryx._core.paths import path_str
from metoryx._core.rng import fold_in_path, fold_in_paths, path_words
from metoryx._core.typed import Tracer, jnp_array, jnp_asarray, lax_gather, lax_map

# The most elements drawn in one vmapped call: a group holds its stacked draw and the split
# arrays at once, so a larger one is drawn in several calls to bound that transient memory
# (256 MiB of float32 per call).
MAX_GROUP_ELEMENTS = 1 << 26


class Group(NamedTuple):
    """Draws made together: their initializer, shape and dtype, and per draw its slot and path
    hash. A stacked variable (a copy per layer of ``mx.Repeat``) is a run of draws of its slot,
    one per copy, each with the key of that copy's unrolled path."""

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
            if not var.has_value and getattr(var.init, "vectorizable", False) is True:
                dtype = jax.dtypes.canonicalize_dtype(var.dtype)
                try:
                    alike.setdefault((var.init, var.shape, dtype), []).append(i)
                    continue
                except TypeError:  # an unhashable initializer: drawn alone
                    pass
            steps.append(i)
        for (init, shape, dtype), slots in alike.items():
            draws = [(i, p) for i in slots for p in variables[i].copy_paths()]
            if len(draws) == 1:
                steps.append(slots[0])
                continue
            per_call = max(MAX_GROUP_ELEMENTS // max(math.prod(shape), 1), 1)
            for start in range(0, len(draws), per_call):
                chunk = draws[start : start + per_call]
                words = path_words(p for _, p in chunk)
                steps.append(Group(init, shape, dtype, [i for i, _ in chunk], words))
        # In the order of the variables, so that the first failing one is the one reported.
        steps.sort(key=lambda step: step.slots[0] if isinstance(step, Group) else step)
        self.steps = steps

    def draw(self, key: jax.Array) -> list[jax.Array]:
        """The array of every variable, in slot order, from the root ``key``."""
        arrays: list[Any] = [None] * len(self.variables)
        pieces: dict[int, list[jax.Array]] = {}  # the draws of stacked slots, in copy order
        for step in self.steps:
            if isinstance(step, int):
                arrays[step] = init_one(key, self.variables[step])
                continue
            drawn = _draw_group(key, step)
            if drawn is None:
                for i in dict.fromkeys(step.slots):
                    arrays[i] = init_one(key, self.variables[i])
                continue
            runs = _runs(step.slots)
            for (i, _), part in zip(runs, _split(drawn, runs), strict=True):
                if self.variables[i].axes:
                    pieces.setdefault(i, []).append(part)
                else:
                    arrays[i] = part.reshape(self.variables[i].shape)
        for i, parts in pieces.items():
            if arrays[i] is None:
                flat = parts[0] if len(parts) == 1 else jnp.concatenate([p.ravel() for p in parts])
                arrays[i] = flat.reshape(self.variables[i].shape)
        return arrays


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """``[3, 3, 5, 3]`` -> ``[(3, 2), (5, 1), (3, 1)]``: consecutive equal slots and counts."""
    runs: list[tuple[int, int]] = []
    for i in slots:
        if runs and runs[-1][0] == i:
            runs[-1] = (i, runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _split(drawn: jax.Array, runs: list[tuple[int, int]]) -> list[jax.Array]:
    """The draws of each run of a group, ``runs[j][1]`` of them per part, in order; a part
    holds its draws in row-major order, in whatever shape, for the caller to reshape.

    Eagerly, slices. Traced, a gather of constant rows per part, which XLA compiles as one
    kernel for the whole group where slices are a kernel each (why: ``_core/README.md``). A
    draw's rows are those of its first axis, or for one-dimensional draws ``k`` rows of its
    ``m`` elements, ``k`` the smallest factor of ``m`` above 1: no index array is a lone scalar,
    which XLA would fold into the kernel as it does a slice's start.
    """
    counts = [count for _, count in runs]
    shape = drawn.shape[1:]
    size = math.prod(shape)
    if not isinstance(drawn, Tracer) or size < 2:
        return list(jnp.unstack(drawn) if max(counts) == 1 else lax.split(drawn, counts))
    if len(shape) >= 2 and shape[0] >= 2:  # rows of the draws' own first axis: no reshape
        k, rows = shape[0], drawn.reshape(len(drawn) * shape[0], *shape[1:])
    else:
        k = next((f for f in range(2, math.isqrt(size) + 1) if size % f == 0), size)
        rows = drawn.reshape(len(drawn) * k, size // k)
    numbers = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(1, rows.ndim)), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    parts: list[jax.Array] = []
    start = 0
    for count in counts:
        index = np.arange(start * k, (start + count) * k, dtype=np.int32)[:, None]
        parts.append(
            lax_gather(
                rows,
                index,
                numbers,
                (1, *rows.shape[1:]),
                indices_are_sorted=True,
                unique_indices=True,
                mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
            )
        )
        start += count
    return parts


def _draw_group(key: jax.Array, group: Group) -> jax.Array | None:
    """The group's draws stacked from one vmapped draw, or None to draw them one by one."""
    keys = fold_in_paths(key, group.words)

    def draw(one_key: jax.Array) -> Any:
        return group.init(one_key, group.shape, group.dtype)

    try:
        # Traced, a loop: its boundary keeps XLA from fusing the sampler's arithmetic into the
        # kernel of every output slice, which made those kernels 3x slower to compile on CPU.
        # Eagerly, vmap: each operation is dispatched once for the group, nothing is compiled.
        stacked = lax_map(draw, keys) if isinstance(keys, Tracer) else jax.vmap(draw)(keys)
    except Exception:
        return None  # drawn one by one, whose error names the variable
    if not isinstance(stacked, jax.Array) or stacked.shape != (len(group.slots), *group.shape):
        return None
    if stacked.dtype != group.dtype:
        stacked = stacked.astype(group.dtype)
    return stacked


def init_one(key: jax.Array, bound: BoundVariable) -> jax.Array:
    """The array of one variable: a copy of its fixed value, or a draw per copy with its key.

    A stacked variable's fixed value is either one copy's (every copy starts from it) or the
    whole stack's (as ``mx.assign_variables`` sets it from trained variables).
    """
    var = bound.variable
    dtype = jax.dtypes.canonicalize_dtype(var.dtype)
    if var.has_value:
        # A copy: the caller owns what init_fn returns and may donate or delete it, which
        # must not destroy the model's fixed value (often the user's own array).
        value = jnp_asarray(var.value, dtype=dtype)
        return jnp_array(jnp.broadcast_to(value, bound.shape), copy=True)
    draws = [_draw_one(key, path, bound) for path in bound.copy_paths()]
    if not bound.axes:
        return draws[0]
    return jnp.stack(draws).reshape(bound.shape)


def _draw_one(key: jax.Array, path: tuple[str, ...], bound: BoundVariable) -> jax.Array:
    var = bound.variable
    dtype = jax.dtypes.canonicalize_dtype(var.dtype)
    try:
        value = var.init(fold_in_path(key, path), var.shape, dtype)
        if not isinstance(value, jax.Array):
            value = jnp_asarray(value)
    except errors.MetoryxError as e:
        e.add_note(f"(raised by the initializer of {path_str(path)}: {var!r})")
        raise
    except Exception as e:
        raise errors.VariableDefinitionError(
            f"{path_str(path)}: its initializer {var.init!r} cannot make an array of dtype "
            f"{dtype.name} and shape {var.shape} ({type(e).__name__}: {str(e).rstrip('.')}). "
            f"Give the variable an initializer that makes this dtype (the random ones make "
            f"floating arrays: use zeros or ones for an integer or bool variable), or that dtype."
        ) from e
    if value.shape != var.shape:
        raise errors.VariableShapeError(
            f"{path_str(path)}: its initializer {var.init!r} returned shape "
            f"{value.shape}, expected {var.shape}. An initializer must honor the `shape` "
            f"it is given."
        )
    return value if value.dtype == dtype else jnp_asarray(value, dtype=dtype)
