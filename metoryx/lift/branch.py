"""``mx.cond`` and ``mx.switch``: ``lax.cond``/``lax.switch`` over modules and model code.

The branches may be sub-modules or any functions of the model's code: they may assign State,
draw random keys (the same ones the taken branch would draw unlifted) and sow values. Each
branch is traced twice: once to learn what it assigns and sows, so that every branch returns
all of it (``lax.switch`` needs one output structure), and once into the conditional.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.context import innermost_frame
from metoryx._core.lifting import Region
from metoryx._core.variables import numeric_dtype


def switch(index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
    """Run ``branches[index](*operands)``, staged as one ``lax.switch``.

    Inside a model's method the branches may be sub-modules (``self.a``) or functions that
    use them. A State that any branch assigns is assigned by all (the others pass its value
    through); keys drawn inside are those the taken branch would draw unlifted. Afterwards
    each stream continues after the most keys any branch draws (the counters are fixed when
    the program is traced, before the branch is known), so code after a branch that drew
    fewer keys gets other keys than it would unlifted: still distinct and reproducible. Values
    sown inside are recorded only if every branch sows the same names with the same shapes.
    Outside ``apply_fn`` it is ``lax.switch``.

    Args:
        index: an int or a 0-d integer array (traced is fine); clamped to the valid range, as
            in ``lax.switch``.
        branches: a list (or tuple) of callables, each taking ``*operands`` and returning
            outputs of one structure, shape and dtype.
        *operands: the arguments passed to the branch.

    Returns:
        The taken branch's output.

    Raises:
        LayerConfigError: if ``branches`` is not a non-empty list of callables.
        InputDtypeError: if ``index`` is not an int or an integer array.
        InputShapeError: if ``index`` is an array with axes.
        LayerConfigError: also when the branches return outputs of different structures,
            shapes or dtypes, or values that are no arrays.
        TransformBoundaryError: when the branches sow different values.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Router(mx.Module):
        ...     def __init__(self):
        ...         self.experts = [mx.Dense(2, 2) for _ in range(3)]
        ...     def __call__(self, i, x):
        ...         return mx.switch(i, self.experts, x)
        >>> init_fn, apply_fn = mx.transform(Router())
        >>> variables = init_fn(jax.random.key(0))
        >>> y, _ = jax.jit(apply_fn)(variables, None, 2, jnp.ones((1, 2)))
        >>> bool(jnp.allclose(y, mx.apply(Router(), method=lambda m, x: m.experts[2](x))(
        ...     variables, None, jnp.ones((1, 2)))[0]))
        True
    """
    branches = _check_branches(branches)
    index = _check_index("mx.switch", "index", index, len(branches))
    names = [f"branch {i}" for i in range(len(branches))]
    return _switch("mx.switch", names, index, branches, operands)


def _switch(
    where: str, names: list[str], index: Any, branches: list[Callable[..., Any]], operands: Any
) -> Any:
    """``switch`` once its arguments are checked; ``names`` name the branches in errors."""
    branches = [_checked_output(where, n, b) for n, b in zip(names, branches, strict=True)]
    found = innermost_frame()
    if found is None:
        _check_outputs(where, names, [jax.eval_shape(b, *operands) for b in branches])
        return lax.switch(index, branches, *operands)
    region = Region(*found, where)

    def lifted(branch: Callable[..., Any], writes: Sequence[int] | None) -> Callable[..., Any]:
        def body(*ops: Any) -> tuple[Any, Any, Any]:
            with region.body() as child:
                out = branch(*ops)
            written = child.written if writes is None else writes
            return out, {s: child.values[s] for s in written}, child.captured

        return body

    shapes = [jax.eval_shape(lifted(b, None), *operands) for b in branches]
    _check_outputs(where, names, [out for out, _, _ in shapes])
    writes = sorted({s for _, written, _ in shapes for s in written})
    sown = [_signature(captured) for _, _, captured in shapes]
    if any(s != sown[0] for s in sown):
        raise errors.TransformBoundaryError(
            f"mx.switch/mx.cond: the branches record different values ({_sown_keys(shapes)}); "
            f"every branch must return the same outputs, so a value sown (or a module output "
            f"captured) in one branch must be recorded, with the same shape and dtype, in "
            f"all. Sow the same names in every branch, or record outside the branches."
        )
    out, written, captured = lax.switch(index, [lifted(b, writes) for b in branches], *operands)
    region.finish(written, captured)
    return out


def _checked_output(where: str, name: str, branch: Callable[..., Any]) -> Callable[..., Any]:
    """``branch``, raising a LayerConfigError (at trace time) for an output that is no array."""

    def run(*ops: Any) -> Any:
        out = branch(*ops)
        bad = [leaf for leaf in jax.tree.leaves(out) if not _is_array_like(leaf)]
        if bad:
            raise errors.LayerConfigError(
                f"{where}: {name} returned {type(bad[0]).__name__} {bad[0]!r:.40}, which is no "
                f"array. Every branch must return arrays (or a PyTree of them) of one "
                f"structure, shape and dtype."
            )
        return out

    return run


def _is_array_like(leaf: Any) -> bool:
    if isinstance(leaf, jax.Array) or type(leaf) in (bool, int, float, complex):
        return True
    return isinstance(leaf, (np.ndarray, np.generic)) and numeric_dtype(leaf.dtype) is not None


def _check_outputs(where: str, names: list[str], outputs: list[Any]) -> None:
    """The branches' outputs (from ``jax.eval_shape``) must agree, as ``lax.switch`` needs."""
    found = [_signature(out) for out in outputs]
    if any(f != found[0] for f in found):
        described = "; ".join(
            f"{name} returns {_shapes(out)}" for name, out in zip(names, outputs, strict=True)
        )
        raise errors.LayerConfigError(
            f"{where}: the branches must return outputs of one structure, shape and dtype (all "
            f"of them are staged into one lax.switch); {described:.400}. Make them agree: "
            f"cast, reshape or return the same tuple in every branch."
        )


def _shapes(out: Any) -> str:
    return str(jax.tree.map(lambda leaf: f"{leaf.dtype}{list(leaf.shape)}", out))


def cond(
    pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any
) -> Any:
    """Run ``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``, as ``lax.cond``.

    As :func:`switch` with two branches: inside a model's method the branches may be
    sub-modules or functions that use them, assign State and draw random keys.

    Args:
        pred: a bool, an int (true when nonzero, as in ``lax.cond``) or a 0-d boolean or
            integer array (traced is fine).
        true_fn: called when ``pred`` is true.
        false_fn: called when ``pred`` is false.
        *operands: the arguments passed to the branch.

    Returns:
        The taken branch's output.

    Raises:
        LayerConfigError: if ``true_fn`` or ``false_fn`` is not callable.
        InputDtypeError: if ``pred`` is not a bool, an int or a boolean or integer array.
        InputShapeError: if ``pred`` is an array with axes.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Gate(mx.Module):
        ...     def __init__(self):
        ...         self.fc = mx.Dense(2, 2)
        ...     def __call__(self, use_fc, x):
        ...         return mx.cond(use_fc, self.fc, lambda x: x, x)
        >>> init_fn, apply_fn = mx.transform(Gate())
        >>> variables = init_fn(jax.random.key(0))
        >>> y, _ = jax.jit(apply_fn)(variables, None, False, jnp.ones((1, 2)))
        >>> y.tolist()
        [[1.0, 1.0]]
    """
    for name, fn in (("true_fn", true_fn), ("false_fn", false_fn)):
        if not callable(fn):
            raise errors.LayerConfigError(
                f"mx.cond: `{name}` must be a function or a module, called with the operands, "
                f"got {type(fn).__name__} {fn!r:.60}. Pass e.g. self.layer or lambda x: x."
            )
    pred = _check_index("mx.cond", "pred", pred, 2)
    if not isinstance(pred, int):  # an array: nonzero is true, as in lax.cond
        pred = lax.convert_element_type(pred if pred.dtype == np.bool_ else pred != 0, np.int32)
    return _switch("mx.cond", ["false_fn", "true_fn"], pred, [false_fn, true_fn], operands)


def _check_branches(branches: Any) -> list[Callable[..., Any]]:
    """``branches`` as a list, if it is a non-empty sequence of callables."""
    if not isinstance(branches, Sequence) or isinstance(branches, (str, bytes)):
        raise errors.LayerConfigError(
            f"mx.switch: `branches` must be a list of functions or modules, one per index, got "
            f"{type(branches).__name__} {branches!r:.60}. Pass e.g. [self.a, self.b]."
        )
    found = list(cast("Sequence[Any]", branches))
    if not found:
        raise errors.LayerConfigError(
            "mx.switch needs at least one branch: `branches` is empty. Pass e.g. [self.a, self.b]."
        )
    bad = {i: f"{type(b).__name__} {b!r:.40}" for i, b in enumerate(found) if not callable(b)}
    if bad:
        raise errors.LayerConfigError(
            f"mx.switch: every branch must be a function or a module, called with the operands; "
            f"these are not callable: {bad}. Pass e.g. [self.a, self.b]."
        )
    return found


def _check_index(where: str, name: str, value: Any, count: int) -> Any:
    """An index or predicate: a Python int (a bool for ``pred``), clamped to the ``count``
    branches (as ``lax.switch`` clamps; no int32 overflow for a huge one), or a 0-d integer
    (or, for ``pred``, boolean) array, traced or not, returned as it is."""
    allow_bool = name == "pred"
    if isinstance(value, (int, np.integer, np.bool_)) and (
        allow_bool or not isinstance(value, (bool, np.bool_))
    ):
        number = int(value)
        if allow_bool:
            return int(number != 0)
        return min(max(number, 0), count - 1)
    kinds = "a bool, an int or a boolean or integer" if allow_bool else "an int or an integer"
    array = cast(Any, value) if isinstance(value, (jax.Array, np.ndarray)) else None
    dtype = None if array is None else array.dtype
    fits = dtype is not None and (
        jnp.issubdtype(dtype, jnp.integer) or (allow_bool and dtype == np.bool_)
    )
    if array is None or not fits:
        given = f"an array of dtype {dtype}" if dtype is not None else type(value).__name__
        raise errors.InputDtypeError(
            f"{where}: `{name}` must be {kinds} scalar array (traced is fine), got {given} "
            f"{value!r:.60}. "
            + (
                "For a float, compare it: pred=x > 0."
                if allow_bool
                else "Cast it: index.astype(jnp.int32); for a condition, use mx.cond."
            )
        )
    if array.ndim:
        raise errors.InputShapeError(
            f"{where}: `{name}` must be a single value (0-d), got an array of shape "
            f"{array.shape}. To choose per example, map it: jax.vmap, or mx.vmap around a "
            f"module."
        )
    return array


def _signature(captured: Any) -> Any:
    """What a branch records, as structure, shapes and dtypes (from ``jax.eval_shape``)."""
    leaves, treedef = jax.tree.flatten(captured)
    return treedef, [(leaf.shape, leaf.dtype) for leaf in leaves]


def _sown_keys(shapes: list[Any]) -> str:
    keys = [sorted(captured) for _, _, captured in shapes]
    return "; ".join(f"branch {i}: {k or 'nothing'}" for i, k in enumerate(keys))
