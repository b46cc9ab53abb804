"""Back to the definition world: a copy of a model whose variables start from given arrays."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

from metoryx import errors
from metoryx._core.arguments import bool_argument
from metoryx._core.context import BoundVariable
from metoryx._core.module import Module
from metoryx._core.paths import flatten_variables, path_str
from metoryx._core.transform import mismatch_report
from metoryx._core.tree import walk
from metoryx._core.typed import np_shape
from metoryx._core.variables import fix_stacked_value

M = TypeVar("M", bound=Module)


def assign_variables(model: M, variables: Mapping[str, Any], strict: bool = True) -> M:
    """A copy of ``model`` whose variables carry the arrays of ``variables`` as starting values.

    This is the way back from the execution world: train, assign, edit the model (replace the
    head, add layers), transform again. The original model is never modified, also when an
    error is raised. Arrays are cast to each variable's dtype; shapes must match.

    Args:
        model: the definition-world model.
        variables: a nested dict as ``init_fn``/``apply_fn`` produce, ``{collection: {...}}``.
        strict: if True, every variable of the model must get an array and every array must
            be used. If False, variables without an array keep their initializer and unused
            arrays are ignored; a :class:`~metoryx.errors.PartialAssignmentWarning` lists both.

    Returns:
        The modified copy.

    Raises:
        LayerConfigError: if ``strict`` is not a bool.
        VariablesStructureError: with ``strict=True``, listing all missing and unused paths.
        VariableShapeError: listing every path whose array has the wrong shape.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.body = mx.Dense(4, 8)
        ...         self.head = mx.Dense(8, 2)
        >>> trained = mx.init(Net())(jax.random.key(0))
        >>> net = mx.assign_variables(Net(), trained)
        >>> net.head = mx.Dense(8, 5)                      # a new head for a new task
        >>> new = mx.init(net)(jax.random.key(1))
        >>> body, trained_body = new["params"]["body"], trained["params"]["body"]
        >>> bool(jnp.array_equal(body["kernel"], trained_body["kernel"]))
        True
    """
    strict = bool_argument("assign_variables", "strict", strict)
    tree = walk(model)
    if not isinstance(variables, Mapping):
        raise errors.VariablesStructureError(
            f"assign_variables expects the nested dict init_fn returns, e.g. "
            f"{{'params': {{...}}}}; got {type(variables).__name__}."
        )
    given = flatten_variables(variables)
    wanted = dict(tree.variables)
    # A variable that a lifted wrapper stacks takes the array of all its copies.
    shapes = {p: BoundVariable(p, v, tree.axes.get(p, ())).shape for p, v in wanted.items()}
    missing = [path_str(p) for p in wanted if p not in given]
    unused = [path_str(p) for p in given if p not in wanted]
    wrong = [
        f"{path_str(p)}: expected {shapes[p]}, got {tuple(np_shape(given[p]))}"
        for p in wanted
        if p in given and tuple(np_shape(given[p])) != shapes[p]
    ]
    if wrong:
        raise errors.VariableShapeError(
            "assign_variables: these arrays do not fit the model's variables:\n  "
            + "\n  ".join(wrong)
            + "\nThe model's layers must have the shapes the arrays were trained with; replace "
            "the differing layers after assigning (with strict=False for the rest)."
        )
    if strict and (missing or unused):
        raise errors.VariablesStructureError(mismatch_report(missing, unused))

    memo = tree.copy_memo()
    result = copy.deepcopy(model, memo)
    for path, var in wanted.items():
        if path in given:
            if path in tree.axes:  # every copy's value: more than the setter's one copy
                fix_stacked_value(memo[id(var)], given[path])
            else:
                memo[id(var)].value = given[path]
    if missing or unused:
        warnings.warn(
            errors.PartialAssignmentWarning(
                f"assign_variables(strict=False): {len(missing)} variables kept their "
                f"initializer ({', '.join(missing) or 'none'}); {len(unused)} arrays were not "
                f"used ({', '.join(unused) or 'none'}).",
                tuple(missing),
                tuple(unused),
            ),
            stacklevel=2,
        )
    return result
