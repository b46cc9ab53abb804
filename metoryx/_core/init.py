"""How ``init_fn`` makes its arrays: alike variables in one draw, the others one by one.

Drawing each variable with its own call puts one random program per variable into
``jax.jit(init_fn)``: XLA then compiles a 100-layer model ~10x slower than a 3-layer one.
Variables that share an initializer (by ``==``), a shape and a dtype are therefore drawn
together: one ``lax.map`` of the initializer over their stacked path-derived keys, split into
the variables by gathers that XLA compiles as one kernel for the whole group (``_split``).
Called eagerly, these draws run as one jitted program, shared by the snapshots of equal models
through a bounded module-level cache (``_program``). Each draw keeps its key and the
initializer's operations, so it is the one-by-one draw; its bits are too wherever the compiler
cannot round the two kernels differently, which the uniform initializers guarantee and the
normal ones do not (a fused multiply-add XLA:CPU makes in one kernel and not in the other:
``Initializer`` in ``metoryx.initializers`` states the bound).

Only initializers that declare ``vectorizable = True`` (see ``metoryx.initializers``) are
grouped: vmap calls a function once, with tracers, so one with Python side effects, one that
is not traceable, or one whose batched form computes differently (a batched QR) must be called
per variable. Fixed values are copied, and a group whose draw fails or returns the wrong shape is
drawn again one by one, so the error names the variable's path exactly as it would alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.context import BoundVariable, StackAxis
from metoryx._core.paths import Path, path_str
from metoryx._core.rng import fold_in_path, fold_in_paths, path_words
from metoryx._core.typed import (
    Tracer,
    jit,
    jnp_array,
    jnp_asarray,
    lax_gather,
    lax_map,
    np_concatenate,
)
from metoryx._core.variables import Parameter

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
    (it decides the canonical dtypes, hence the groups).

    Called eagerly, the draws of our own initializers (the pure ones: ``vectorizable`` or a
    key-free fill of ours) run as one jitted program: dispatched one operation at a time, each
    operation of each shape would be a compile of its own (~30 for a 12-block GPT, twice the
    time of the one program), and one program is also one entry for JAX's persistent
    compilation cache. The program is made from ``program_key`` alone (every path,
    initializer, shape, dtype and stacked axis it draws) and kept in a bounded cache shared by
    all snapshots (``_program``), so a second transform of an equal model reuses it, with no
    trace and no compile. Fixed values and any other initializer are drawn eagerly, as they
    would be alone: a user's initializer may have side effects or not trace.
    """

    def __init__(self, variables: list[BoundVariable]):
        self.variables = variables
        self.limit = MAX_GROUP_ELEMENTS
        steps = _steps(variables, self.limit)
        self.steps = steps
        specs = {i: _spec(bound) for i, bound in enumerate(variables)}
        self.compiled = [i for i, spec in specs.items() if spec is not None]
        self.rest = [s for s in steps if isinstance(s, int) and specs[s] is None]
        self.program_key = (tuple(specs[i] for i in self.compiled), self.limit)
        self.all = _Pass(variables, steps)
        self.program: Callable[[jax.Array], list[jax.Array]] | None = None

    def draw(self, key: jax.Array) -> list[jax.Array]:
        """The array of every variable, in slot order, from the root ``key``."""
        if isinstance(key, Tracer) or not self.compiled:
            return self.all.draw(key)
        if self.program is None:  # looked up once, so later inits do not hash the key again
            self.program = _program(*self.program_key)
        try:
            drawn = self.program(key)
        except errors.MetoryxError:
            # Drawn again step by step, eagerly: the error then names the first failing variable
            # in the order of the variables, as it does without the jitted program.
            return self.all.draw(key)
        arrays: list[Any] = [None] * len(self.variables)
        for i, array in zip(self.compiled, drawn, strict=True):
            arrays[i] = array
        for i in self.rest:
            arrays[i] = init_one(key, self.variables[i])
        return arrays


def _steps(variables: list[BoundVariable], limit: int) -> list[Group | int]:
    """The draws of ``variables`` in the order of the variables: a ``Group`` of alike ones (at
    most ``limit`` elements per group), or the slot of one drawn alone."""
    alike: dict[tuple[Any, tuple[int, ...], np.dtype], list[int]] = {}
    steps: list[Group | int] = []
    for i, bound in enumerate(variables):
        var = bound.variable
        if var.has_value or getattr(var.init, "vectorizable", False) is not True:
            steps.append(i)
            continue
        dtype = jax.dtypes.canonicalize_dtype(var.dtype)
        try:
            alike.setdefault((var.init, var.shape, dtype), []).append(i)
        except TypeError:  # an unhashable initializer: drawn alone
            steps.append(i)
    for (init, shape, dtype), slots in alike.items():
        draws = [(i, p) for i in slots for p in variables[i].copy_paths()]
        if len(draws) == 1:
            steps.append(slots[0])
            continue
        per_call = max(limit // max(math.prod(shape), 1), 1)
        for start in range(0, len(draws), per_call):
            chunk = draws[start : start + per_call]
            words = path_words(p for _, p in chunk)
            steps.append(Group(init, shape, dtype, [i for i, _ in chunk], words))
    # In the order of the variables, so that the first failing one is the one reported.
    steps.sort(key=lambda step: step.slots[0] if isinstance(step, Group) else step)
    return steps


class Spec(NamedTuple):
    """All that the compiled draw of one variable depends on: its path (the key's hash), its
    initializer (compared with ``==``, as groups are), shape, canonical dtype and stacked axes.
    Equal specs are equal draws, whichever snapshot they come from."""

    path: Path
    init: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[StackAxis, ...]


def _spec(bound: BoundVariable) -> Spec | None:
    """The spec of a variable that the compiled program draws; None for one drawn eagerly: a
    fixed value, an initializer that is neither ``vectorizable`` (a promise to be pure and
    traceable) nor a key-free fill of ours, or one that cannot key a cache (unhashable)."""
    var = bound.variable
    if var.has_value:
        return None
    if getattr(var.init, "vectorizable", False) is not True and not _is_key_free(var.init):
        return None
    dtype = jax.dtypes.canonicalize_dtype(var.dtype)
    spec = Spec(bound.path, var.init, var.shape, dtype, bound.axes)
    try:
        hash(spec)
    except TypeError:
        return None
    return spec


# How many compiled init programs are kept: one per distinct model structure in use. An evicted
# program is traced and compiled again if its model comes back.
PROGRAMS = 64


@functools.lru_cache(maxsize=PROGRAMS)
def _program(specs: tuple[Spec, ...], limit: int) -> Callable[[jax.Array], list[jax.Array]]:
    """The jitted draw of ``specs``: arrays in their order, from the root key.

    The only state shared by snapshots (a bounded cache, documented in ``_core/README.md``).
    It is traced from the specs alone, through variables rebuilt from them, so nothing of the
    snapshot that first asked for it is kept or read: the key is all the program depends on,
    and an entry for an equal key is the same program.
    """
    variables = [BoundVariable(s.path, Parameter(s.init, s.shape, s.dtype), s.axes) for s in specs]
    draws = _Pass(variables, _steps(variables, limit))

    def init_program(key: jax.Array) -> list[jax.Array]:
        return draws.draw(key)

    return jit(init_program)


def _is_key_free(init: Any) -> bool:
    """Whether ``init`` is one of our fills, which ignore the key: a stacked variable is then
    one call for all copies, and needs no key."""
    return init is initializers.zeros or init is initializers.ones


class _Pass:
    """Steps drawn in one go, with the path words of every keyed draw among them in order.

    Under a trace, the keys of all of them are derived in one batched ``fold_in`` (one threefry
    loop for XLA to compile, not one per group and variable), then sliced; the same bits as
    one derivation per draw, since ``fold_in`` is integer arithmetic.
    """

    def __init__(self, variables: list[BoundVariable], steps: list[Group | int]):
        self.variables = variables
        self.steps = steps
        self.spans: list[tuple[int, int] | None] = []
        chunks: list[np.ndarray[Any, np.dtype[np.uint32]]] = []
        count = 0
        for step in steps:
            words = step.words if isinstance(step, Group) else _single_words(variables[step])
            if words is None:
                self.spans.append(None)
                continue
            self.spans.append((count, count + len(words)))
            chunks.append(words)
            count += len(words)
        self.words = np_concatenate(chunks) if chunks else np.zeros((0, 2), np.uint32)

    def draw(self, key: jax.Array) -> list[Any]:
        """The arrays of the steps' variables (None in the other slots), from the root key."""
        arrays: list[Any] = [None] * len(self.variables)
        pieces: dict[int, list[jax.Array]] = {}  # the draws of stacked slots, in copy order
        keys = (
            fold_in_paths(key, self.words) if isinstance(key, Tracer) and self.words.size else None
        )
        for step, span in zip(self.steps, self.spans, strict=True):
            step_keys = None if keys is None or span is None else keys[span[0] : span[1]]
            if isinstance(step, int):
                arrays[step] = init_one(key, self.variables[step], step_keys)
                continue
            drawn = _draw_group(key, step, step_keys)
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


def _single_words(bound: BoundVariable) -> np.ndarray | None:
    """The path words of a variable drawn alone, one row per copy; None if it needs no key."""
    var = bound.variable
    if var.has_value or _is_key_free(var.init):
        return None
    return path_words(bound.copy_paths())


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


def _draw_group(key: jax.Array, group: Group, keys: jax.Array | None) -> jax.Array | None:
    """The group's draws stacked from one vmapped draw, or None to draw them one by one.
    ``keys`` are the draws' keys if already derived from ``key``."""
    if keys is None:
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


def init_one(key: jax.Array, bound: BoundVariable, keys: jax.Array | None = None) -> jax.Array:
    """The array of one variable: a copy of its fixed value, or a draw per copy with its key.

    ``keys`` are the copies' keys if already derived from the root ``key``. A key-free fill
    of ours is one call for the whole stack. A stacked variable's fixed value is either one
    copy's (every copy starts from it) or the whole stack's (as ``mx.assign_variables`` sets it
    from trained variables).
    """
    var = bound.variable
    dtype = jax.dtypes.canonicalize_dtype(var.dtype)
    if var.has_value:
        # A copy: the caller owns what init_fn returns and may donate or delete it, which
        # must not destroy the model's fixed value (often the user's own array).
        value = jnp_asarray(var.value, dtype=dtype)
        return jnp_array(jnp.broadcast_to(value, bound.shape), copy=True)
    if _is_key_free(var.init):
        return _draw_one(key, bound.path, bound, bound.shape)
    paths = bound.copy_paths()
    if keys is None:
        draws = [_draw_one(fold_in_path(key, p), p, bound, var.shape) for p in paths]
    else:
        draws = [_draw_one(keys[j], p, bound, var.shape) for j, p in enumerate(paths)]
    if not bound.axes:
        return draws[0]
    return jnp.stack(draws).reshape(bound.shape)


def _draw_one(
    key: jax.Array, path: tuple[str, ...], bound: BoundVariable, shape: tuple[int, ...]
) -> jax.Array:
    """One call of the variable's initializer with its (derived) ``key``, checked."""
    var = bound.variable
    dtype = jax.dtypes.canonicalize_dtype(var.dtype)
    try:
        value = var.init(key, shape, dtype)
        if not isinstance(value, jax.Array):
            value = jnp_asarray(value)
    except errors.MetoryxError as e:
        e.add_note(f"(raised by the initializer of {path_str(path)}: {var!r})")
        raise
    except Exception as e:
        raise errors.VariableDefinitionError(
            f"{path_str(path)}: its initializer {var.init!r} cannot make an array of dtype "
            f"{dtype.name} and shape {shape} ({type(e).__name__}: {str(e).rstrip('.')}). "
            f"Give the variable an initializer that makes this dtype (the random ones make "
            f"floating arrays: use zeros or ones for an integer or bool variable), or that dtype."
        ) from e
    if value.shape != shape:
        raise errors.VariableShapeError(
            f"{path_str(path)}: its initializer {var.init!r} returned shape "
            f"{value.shape}, expected {shape}. An initializer must honor the `shape` "
            f"it is given."
        )
    return value if value.dtype == dtype else jnp_asarray(value, dtype=dtype)
