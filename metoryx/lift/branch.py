"""``mx.cond`` and ``mx.switch``: ``lax.cond``/``lax.switch`` over modules and model code.

The branches may be sub-modules or any functions of the model's code: they may assign State,
draw random keys (the same ones the taken branch would draw unlifted) and sow values. Each
branch is traced twice: once to learn what it assigns and sows, so that every branch returns
all of it (``lax.switch`` needs one output structure), and once into the conditional.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.context import innermost_frame
from metoryx._core.lifting import Region


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
        index: an integer scalar; clamped to the valid range, as in ``lax.switch``.
        branches: the callables, each taking ``*operands`` and returning outputs of one
            structure, shape and dtype.
        *operands: the arguments passed to the branch.

    Returns:
        The taken branch's output.

    Raises:
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
    branches = list(branches)
    found = innermost_frame()
    if found is None:
        return lax.switch(index, branches, *operands)
    if not branches:
        raise errors.LayerConfigError("mx.switch needs at least one branch.")
    region = Region(*found, "mx.switch")

    def lifted(branch: Callable[..., Any], writes: Sequence[int] | None) -> Callable[..., Any]:
        def body(*ops: Any) -> tuple[Any, Any, Any]:
            with region.body() as child:
                out = branch(*ops)
            written = child.written if writes is None else writes
            return out, {s: child.values[s] for s in written}, child.captured

        return body

    shapes = [jax.eval_shape(lifted(b, None), *operands) for b in branches]
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


def cond(
    pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any
) -> Any:
    """Run ``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``, as ``lax.cond``.

    As :func:`switch` with two branches: inside a model's method the branches may be
    sub-modules or functions that use them, assign State and draw random keys.

    Args:
        pred: a boolean scalar.
        true_fn: called when ``pred`` is true.
        false_fn: called when ``pred`` is false.
        *operands: the arguments passed to the branch.

    Returns:
        The taken branch's output.

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
    index = lax.convert_element_type(pred, np.int32)
    return switch(index, [false_fn, true_fn], *operands)


def _signature(captured: Any) -> Any:
    """What a branch records, as structure, shapes and dtypes (from ``jax.eval_shape``)."""
    leaves, treedef = jax.tree.flatten(captured)
    return treedef, [(leaf.shape, leaf.dtype) for leaf in leaves]


def _sown_keys(shapes: list[Any]) -> str:
    keys = [sorted(captured) for _, _, captured in shapes]
    return "; ".join(f"branch {i}: {k or 'nothing'}" for i, k in enumerate(keys))
