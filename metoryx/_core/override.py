"""``overridden``: a module's variables read as other arrays for the length of a ``with`` block.

Wrappers that reparametrize a layer's weight (``WeightNorm``, ``SpectralNorm``) compute a new
weight from the stored one and run the unchanged layer on it. Inside ``apply_fn`` a variable
attribute reads the array in its slot of the running :class:`~metoryx._core.context.Frame`;
``overridden`` puts the computed array in that slot and puts the stored one back when the
block ends, however it ends. The frame belongs to one ``apply_fn`` call, so concurrent calls
never see each other's overrides, and all of this happens at trace time: under ``jax.jit`` the
compiled program holds only the computation of the new array and the layer's own operations.

Because the override lives in the variable's slot, every module that holds the same variable
(tied weights) reads the new array inside the block. Only Parameters and read-only States can
be overridden: a mutable State is changed by assigning it, and an override of it would make an
assignment inside the block ambiguous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

from metoryx import errors
from metoryx._core.context import Frame, Slot
from metoryx._core.module import Module, module_label, running_frame
from metoryx._core.paths import path_str
from metoryx._core.typed import np_shape


@contextlib.contextmanager
def overridden(module: Module, **values: Any) -> Generator[None]:
    """Inside the block, ``module.<name>`` reads ``values[name]`` instead of its variable.

    Use it inside ``apply_fn``, on a module of the running model. The arrays are read as given
    (no cast) and must have the variables' shapes. When the block ends, normally or by an
    exception, the variables read their stored arrays again; ``new_variables`` returned by
    ``apply_fn`` never contain the override. Blocks nest: an inner override of the same
    variable wins until it ends.

    Args:
        module: a module of the running model (a snapshot module inside ``apply_fn``).
        **values: variable attribute names of ``module`` and the arrays they read.

    Raises:
        ApplyContextError: outside ``apply_fn``, or on a module of a model that is not
            running.
        ImmutableModuleError: if a name is not a variable attribute of ``module``, or is a
            mutable State.
        VariableShapeError: if an array's shape differs from its variable's.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Doubled(mx.Module):
        ...     def __init__(self):
        ...         self.fc = mx.Dense(2, 2, use_bias=False)
        ...     def __call__(self, x):
        ...         with mx.overridden(self.fc, kernel=2 * self.fc.kernel):
        ...             return self.fc(x)
        >>> init_fn, apply_fn = mx.transform(Doubled())
        >>> variables = init_fn(jax.random.key(0))
        >>> y, new_variables = apply_fn(variables, None, jnp.ones((1, 2)))
        >>> bool(jnp.allclose(y, 2 * (jnp.ones((1, 2)) @ variables["params"]["fc"]["kernel"])))
        True
        >>> new_variables is variables
        True
    """
    found = running_frame(module)
    if found is None:
        raise errors.ApplyContextError(
            f"overridden({module_label(module)}, {', '.join(values)}) was used outside "
            f"apply_fn. Variables become arrays only while a transformed model runs: use "
            f"overridden(self.layer, ...) inside a method of the model that apply_fn runs."
        )
    binding, frame = found
    slots = [
        (_slot(module, binding.templates, frame, name, value), value)
        for name, value in values.items()
    ]
    saved = [frame.values[slot] for slot, _ in slots]
    for slot, value in slots:
        frame.values[slot] = value
    try:
        yield
    finally:
        # In reverse: a variable held under two of the names gets its own array back last.
        for (slot, _), original in zip(reversed(slots), reversed(saved), strict=True):
            frame.values[slot] = original


def _slot(module: Module, templates: dict[str, Any], frame: Frame, name: str, value: Any) -> int:
    """The frame slot that ``module.<name>`` reads, after checking it may read ``value``."""
    template = templates.get(name)
    if type(template) is not Slot:
        variables = sorted(n for n, t in templates.items() if type(t) is Slot)
        held = "holds variables in a container" if template is not None else "is no variable"
        raise errors.ImmutableModuleError(
            f"overridden({module_label(module)}, {name}=...): {name!r} {held}; only an "
            f"attribute that holds one variable can be overridden. Its variable attributes "
            f"are {variables or 'none'}: override one of them, or the sub-module that holds "
            f"the variable you mean."
        )
    bound = frame.variables[template.index]
    where = f"{module_label(module)}.{name} ({path_str(bound.path)})"
    if bound.variable.mutable:
        raise errors.ImmutableModuleError(
            f"overridden: {where} is a mutable State. Such a State changes by assignment "
            f"(`self.{name} = value` in the module's code), which already lasts for the rest "
            f"of the call; overriding it would make an assignment inside the block ambiguous. "
            f"Assign it instead, or declare it with mutable=False if it is a constant."
        )
    shape, expected = tuple(np_shape(value)), frame.shapes[template.index]
    if shape != expected:
        raise errors.VariableShapeError(
            f"overridden: {where} has shape {expected}, got an array of shape "
            f"{shape}. The module computes with the variable's shape: give an array of shape "
            f"{expected}."
        )
    return template.index
