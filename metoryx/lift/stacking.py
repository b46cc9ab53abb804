"""``mx.stack`` and ``mx.unstack``: variables between the stacked and the unrolled layout.

A model with ``self.blocks = mx.Repeat(Block, n)`` stores ``params/blocks/attn/kernel`` with a
leading axis of ``n``; the same model written with ``self.blocks = [Block() for _ in
range(n)]`` stores ``params/blocks/0/attn/kernel`` ... ``params/blocks/{n-1}/attn/kernel``.
These two functions convert a checkpoint from one layout to the other, so that a stacked model
loads an unrolled checkpoint (a PyTorch one loaded into the unrolled model, say) and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from metoryx import errors
from metoryx._core.context import BoundVariable
from metoryx._core.module import Module
from metoryx._core.paths import flatten_variables, path_str, unflatten_variables
from metoryx._core.transform import mismatch_report
from metoryx._core.tree import walk


def _stacked(model: Module) -> list[BoundVariable]:
    tree = walk(model)
    return [BoundVariable(p, v, tree.axes[p]) for p, v in tree.variables if p in tree.axes]


def _flat(variables: Any, what: str) -> dict[tuple[str, ...], Any]:
    if not isinstance(variables, Mapping):
        raise errors.VariablesStructureError(
            f"{what} expects the nested dict init_fn returns, e.g. {{'params': {{...}}}}; got "
            f"{type(variables).__name__}."
        )
    return flatten_variables(variables)


def unstack(model: Module, variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` of ``model`` in the unrolled layout: one entry per copy of each layer.

    Every variable that a lifted wrapper of ``model`` stacks (``mx.Repeat``, and ``mx.scan``
    or ``mx.vmap`` with ``variable_axes``) is split along its copy axes into the paths the
    copies have in the unrolled model (``blocks/kernel`` of shape ``(n, ...)`` becomes
    ``blocks/0/kernel`` ... ``blocks/{n-1}/kernel``). Other entries are kept as they are.

    Args:
        model: the definition-world model whose wrappers say what is stacked.
        variables: its variables, as ``init_fn`` returns them.

    Returns:
        A new nested dict in the unrolled layout.

    Raises:
        VariableShapeError: when a stacked array's leading axes are not the copies'.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> stacked = mx.Repeat(lambda: mx.Dense(3, 3), 4)
        >>> variables = mx.init(stacked)(jax.random.key(0))
        >>> unrolled = mx.unstack(stacked, variables)
        >>> sorted(unrolled["params"]), unrolled["params"]["2"]["kernel"].shape
        (['0', '1', '2', '3'], (3, 3))
        >>> back = mx.stack(stacked, unrolled)
        >>> bool(jnp.array_equal(back["params"]["kernel"], variables["params"]["kernel"]))
        True
    """
    flat = _flat(variables, "mx.unstack")
    out = dict(flat)
    for bound in _stacked(model):
        if bound.path not in flat:
            continue
        value = out.pop(bound.path)
        sizes = bound.shape[: len(bound.axes)]
        if tuple(np.shape(value)) != bound.shape:
            raise errors.VariableShapeError(
                f"mx.unstack: {path_str(bound.path)} is stacked, {np.prod(sizes)} copies of "
                f"shape {bound.variable.shape}, so its array must have shape {bound.shape}; "
                f"got {tuple(np.shape(value))}. Are these variables already unrolled?"
            )
        for index, path in zip(np.ndindex(*sizes), bound.copy_paths(), strict=True):
            out[path] = value[index]
    return unflatten_variables(out)


def stack(model: Module, variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` in the unrolled layout gathered into the stacked layout of ``model``.

    The inverse of :func:`unstack`: for every variable that a lifted wrapper of ``model``
    stacks, the entries of its copies (``blocks/0/kernel`` ... ``blocks/{n-1}/kernel``) are
    stacked into one array at ``blocks/kernel``. Other entries are kept as they are, and an
    entry already stacked is left alone.

    Args:
        model: the definition-world model whose wrappers say what is stacked.
        variables: the unrolled variables, e.g. of the same model written with a list.

    Returns:
        A new nested dict in the layout ``init_fn`` of ``model`` returns.

    Raises:
        VariablesStructureError: listing the copies that are missing.
        VariableShapeError: when the copies' shapes differ from the variable's.

    Example:
        >>> import jax, metoryx as mx
        >>> class Unrolled(mx.Module):
        ...     def __init__(self):
        ...         self.blocks = [mx.Dense(3, 3) for _ in range(4)]
        >>> class Stacked(mx.Module):
        ...     def __init__(self):
        ...         self.blocks = mx.Repeat(lambda: mx.Dense(3, 3), 4)
        >>> checkpoint = mx.init(Unrolled())(jax.random.key(0))
        >>> variables = mx.stack(Stacked(), checkpoint)
        >>> variables["params"]["blocks"]["kernel"].shape
        (4, 3, 3)
    """
    flat = _flat(variables, "mx.stack")
    out = dict(flat)
    missing: list[str] = []
    wrong: list[str] = []
    for bound in _stacked(model):
        paths = bound.copy_paths()
        present = [p for p in paths if p in out]
        if not present and bound.path in out:
            continue  # already stacked
        missing += [path_str(p) for p in paths if p not in out]
        if len(present) != len(paths):
            continue
        parts = [out.pop(p) for p in paths]
        wrong += [
            f"{path_str(p)}: expected {bound.variable.shape}, got {tuple(np.shape(a))}"
            for p, a in zip(paths, parts, strict=True)
            if tuple(np.shape(a)) != bound.variable.shape
        ]
        if not wrong:
            out[bound.path] = jnp.stack([jnp.asarray(a) for a in parts]).reshape(bound.shape)
    if wrong:
        raise errors.VariableShapeError(
            "mx.stack: these copies do not have their layer's shape:\n  " + "\n  ".join(wrong)
        )
    if missing:
        raise errors.VariablesStructureError(mismatch_report(missing, []))
    return unflatten_variables(out)
