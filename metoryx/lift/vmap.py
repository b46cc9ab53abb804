"""``mx.vmap``: a module mapped over an axis, its variables shared or one copy per member.

With shared variables it is a batched call of one module (``jax.vmap`` of its ``__call__``).
With ``variable_axes={"params": 0}`` it is an ensemble inside a model: ``axis_size`` members,
each with its own parameters (stacked on a leading axis, each initialized with the key of its
unrolled path ``members/3/kernel``) and its own random keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metoryx import errors
from metoryx._core.lifting import (
    Region,
    check_split_rngs,
    check_variable_axes,
    plan_of,
    running,
    stacked_copies,
)
from metoryx._core.module import Lifted, Module, module_label
from metoryx._core.paths import path_str


class Vmap(Lifted):
    """A module mapped with ``jax.vmap``; made by :func:`vmap`.

    Attributes:
        module: the wrapped module, a plain layer in the definition world: edit it, or reach
            its sub-modules and variables, through this attribute
            (``model.members.module.kernel``). Its variables sit at the wrapper's own path
            (``members/kernel``, not ``members/module/kernel``).
        axis_size: the size of the mapped axis, or None when each call takes it from the
            inputs.
    """

    def __init__(
        self,
        module: Module,
        in_axes: Any,
        out_axes: Any,
        variable_axes: Any,
        split_rngs: Any,
        axis_size: int | None,
        axis_name: str | None,
    ):
        where = f"mx.vmap({type(module).__name__})"
        if not isinstance(module, Module):
            raise errors.LayerConfigError(
                f"{where}: expected an mx.Module, got {type(module).__name__}. Inside a "
                f"model's method, jax.vmap of a plain function needs no lifting."
            )
        if axis_size is not None and (
            isinstance(axis_size, bool)
            or not isinstance(axis_size, (int, np.integer))
            or not 1 <= int(axis_size) < 2**63  # the leading axis of the stacked variables
        ):
            raise errors.LayerConfigError(
                f"{where}: axis_size must be a positive int below 2**63 (the number of "
                f"members), got {axis_size!r}. Pass e.g. axis_size=4, or None to read it from "
                f"the arguments."
            )
        if axis_name is not None and not isinstance(axis_name, str):
            raise errors.LayerConfigError(
                f"{where}: axis_name must be None or a str naming the mapped axis for "
                f"collectives (jax.lax.pmean(x, 'batch')), got {axis_name!r}."
            )
        self.module = module
        self.in_axes = _axes_spec(where, "in_axes", in_axes)
        self.out_axes = _axes_spec(where, "out_axes", out_axes)
        self.axis_size = None if axis_size is None else int(axis_size)
        self.variable_axes = check_variable_axes(where, variable_axes, self.axis_size)
        self.split_rngs = check_split_rngs(where, split_rngs)
        self.axis_name = axis_name

    def copies(self, collection: str) -> int | None:
        return stacked_copies(self.variable_axes, self.axis_size, collection)

    def isolates(self) -> bool:
        return bool(self.variable_axes)

    def extra_repr(self) -> str:
        axes = f", variable_axes={self.variable_axes}" if self.variable_axes else ""
        return f"axis_size={self.axis_size}, in_axes={self.in_axes}, out_axes={self.out_axes}{axes}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module on each member's slice of ``args`` (``kwargs`` go to all unmapped)."""
        owner, parent = running(self, "mx.vmap")
        plan = plan_of(self)
        size = _mapped_size(self, args)
        region = Region(owner, parent, "mx.vmap", plan.owned, self.split_rngs, size)
        stacked = set(plan.stacked)

        def body(own: dict[int, Any], index: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            with region.body(own, index) as child:
                out = self.module(*args, **kwargs)
            mapped = {s: child.values[s] for s in child.written if s in stacked}
            shared = {s: child.values[s] for s in child.written if s not in stacked}
            return out, mapped, shared, child.captured

        mapped_fn = jax.vmap(
            body,
            in_axes=(0, 0, self.in_axes),
            out_axes=(self.out_axes, 0, None, 0),
            axis_size=size,
            axis_name=self.axis_name,
        )
        own = {s: parent.values[s] for s in plan.stacked}
        try:
            out, mapped, shared, captured = mapped_fn(own, jnp.arange(size, dtype=np.uint32), args)
        except ValueError as e:
            if "out_axes" not in str(e) or not region.written:
                raise
            paths = [path_str(parent.variables[s].path) for s in region.written]
            raise errors.TransformBoundaryError(
                f"{module_label(self)}: mx.vmap's members assign State they share ({paths}) "
                f"with values that differ per member, which one shared array cannot hold. Keep "
                f"a copy per member (variable_axes={{'<collection>': 0}} with axis_size), or "
                f"make the update the same for all (axis_name=... and jax.lax.pmean)."
            ) from e
        region.finish({**shared, **mapped}, captured)
        return out


def _axes_spec(where: str, name: str, value: Any) -> Any:
    """``in_axes``/``out_axes`` as ``jax.vmap`` takes them: an int, None, or a tuple of those
    (pytrees of them inside), one entry per argument; ``out_axes`` may be any prefix of the
    output's pytree. A list becomes a tuple."""
    if isinstance(value, list):
        value = tuple(value)
    containers = (tuple, dict) if name == "out_axes" else (tuple,)
    if value is None or isinstance(value, containers):
        leaves = jax.tree.leaves(value, is_leaf=lambda x: x is None)
        bad = [leaf for leaf in leaves if not (leaf is None or _is_int(leaf))]
    else:
        bad = [] if _is_int(value) else [value]
    if bad:
        raise errors.LayerConfigError(
            f"{where}: `{name}` must be an int (the mapped axis), None (not mapped), or a "
            f"tuple of those with one entry per {'argument' if name == 'in_axes' else 'output'}"
            f", as in jax.vmap; got {value!r}. Pass e.g. {name}=0 or {name}=(0, None)."
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _mapped_size(wrapper: Vmap, args: tuple[Any, ...]) -> int:
    """The size of the mapped axis: ``axis_size``, which the arguments ``in_axes`` maps must
    have, or theirs."""
    sizes: set[int] = set()

    def visit(axis: Any, sub: Any) -> None:
        if axis is not None:
            sizes.update(int(np.shape(leaf)[axis]) for leaf in jax.tree.leaves(sub))

    try:
        jax.tree.map(visit, wrapper.in_axes, args, is_leaf=lambda x: x is None)
    except (ValueError, TypeError, IndexError) as e:
        raise errors.InputShapeError(
            f"{module_label(wrapper)}: in_axes={wrapper.in_axes} does not fit the "
            f"{len(args)} positional arguments given (one int or None for all, or a tuple "
            f"with one entry per argument, each a valid axis): {e}"
        ) from None
    expected = wrapper.axis_size
    if (expected is not None and sizes - {expected}) or (expected is None and len(sizes) != 1):
        what = f"axis_size={expected}" if expected is not None else "one size"
        raise errors.InputShapeError(
            f"{module_label(wrapper)}: mx.vmap maps the arguments that in_axes="
            f"{wrapper.in_axes} selects, over {what}; their mapped axes have sizes "
            f"{sorted(sizes) or 'none (nothing is mapped)'}. Map at least one argument, each "
            f"with that size, or pass axis_size=... (in_axes=None maps none)."
        )
    return expected if expected is not None else sizes.pop()


def vmap(
    module: Module,
    in_axes: int | None | Sequence[Any] = 0,
    out_axes: Any = 0,
    variable_axes: dict[str, int | None] | None = None,
    split_rngs: bool | Sequence[str] = True,
    axis_size: int | None = None,
    axis_name: str | None = None,
) -> Vmap:
    """A module whose call maps ``module`` over an axis of its arguments (``jax.vmap``).

    Assign the result in ``__init__``; the wrapped module's variables keep their paths (the
    wrapper adds no path part).

    - ``variable_axes`` picks the collections kept once per member, stacked on a leading axis
      of size ``axis_size`` (an ensemble: ``{"params": 0}``); the other collections are
      shared by all members. Each member's copy is initialized with the key of its unrolled
      path (``members/3/kernel``). For an ensemble of whole models, ``jax.vmap(init_fn)`` over
      keys works as well, outside the model.
    - Shared mutable State may be assigned only with the same value for every member;
      stacked State is updated per member.
    - Random streams in ``split_rngs`` (all by default) differ per member.
    - ``mx.sow`` inside records one value per member, stacked.

    Args:
        module: the module to map.
        in_axes: as in ``jax.vmap``, for the positional arguments; keyword arguments are
            passed to every member unmapped.
        out_axes: as in ``jax.vmap``.
        variable_axes: ``{collection: 0}`` for the collections kept per member.
        split_rngs: ``True`` (every stream), ``False`` (none) or the stream names to split.
        axis_size: the number of members; required when ``variable_axes`` stacks a
            collection, else read from the mapped arguments.
        axis_name: a name for the mapped axis, for collectives (``jax.lax.pmean``) inside,
            e.g. ``BatchNorm(axis_name=...)``.

    Returns:
        The wrapping module (a ``Vmap``), whose ``.module`` is ``module``.

    Raises:
        LayerConfigError: for an invalid configuration.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Ensemble(mx.Module):
        ...     def __init__(self):
        ...         self.members = mx.vmap(
        ...             mx.Dense(3, 2), in_axes=None, variable_axes={"params": 0}, axis_size=5
        ...         )
        ...     def __call__(self, x):
        ...         return self.members(x)          # (5, batch, 2): one output per member
        >>> init_fn, apply_fn = mx.transform(Ensemble())
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["members"]["kernel"].shape
        (5, 3, 2)
        >>> y, _ = apply_fn(variables, None, jnp.ones((4, 3)))
        >>> y.shape
        (5, 4, 2)
    """
    return Vmap(module, in_axes, out_axes, variable_axes, split_rngs, axis_size, axis_name)
