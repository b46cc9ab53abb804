"""What the execution world knows about each variable: ``mx.variable_info``.

``variables`` is a plain dict of arrays, and that is what goes through ``jax.jit``. Everything
else a tool needs to choose variables by (the module that owns each one, its tags and logical
axes, whether it is stacked) is in a second tree of the same structure whose leaves are small
frozen records. It is made in the definition world, once, and never enters a compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from metoryx import errors
from metoryx._core.context import BoundVariable
from metoryx._core.module import Module
from metoryx._core.paths import Path, path_str, unflatten_variables
from metoryx._core.transform import Snapshot, Transformed
from metoryx._core.tree import walk
from metoryx._core.typed import tree_flatten, tree_unflatten


@dataclasses.dataclass(frozen=True, slots=True)
class VariableInfo:
    """What is known about one variable: a leaf of :func:`variable_info`'s tree.

    Attributes:
        path: the variable's path in ``variables``, collection first:
            ``("params", "encoder", "fc", "kernel")``.
        collection: the top-level key, ``path[0]``.
        shape: the stored array's shape; a variable stacked by ``mx.Repeat``, ``mx.scan`` or
            ``mx.vmap`` has one leading axis per copy axis (``stacked`` gives their sizes).
        dtype: the storage dtype (a layer's ``param_dtype``, not the dtype it computes in).
        module: the class of the module that holds the variable.
        module_path: that module's path (no collection): ``("encoder", "fc")``.
        module_types: the classes of the modules from the root down to ``module``, so that a
            filter by type also finds the variables inside a matching block.
        tags: the variable's tags, sorted.
        axes: a logical axis name or None per dimension of ``shape`` (None on stacked axes),
            or None when the variable names none.
        stacked: the sizes of the leading copy axes; ``()`` for an ordinary variable.
        mutable: whether module code may assign it inside ``apply_fn``.

    Example:
        >>> import metoryx as mx
        >>> info = mx.variable_info(mx.Dense(3, 4))
        >>> info["params"]["kernel"]
        VariableInfo('params/kernel', float32[3, 4], Dense at <root>)
        >>> info["params"]["kernel"].size
        12
    """

    path: Path
    collection: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    module: type[Module]
    module_path: Path
    module_types: tuple[type[Module], ...]
    tags: tuple[str, ...]
    axes: tuple[str | None, ...] | None
    stacked: tuple[int, ...]
    mutable: bool

    @property
    def size(self) -> int:
        """The number of elements of the stored array (all stacked copies)."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """The bytes of the stored array."""
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        shape = f"{self.dtype.name}[{', '.join(map(str, self.shape))}]"
        extras = "".join(
            f", {name}={value!r}"
            for name, value in (("tags", self.tags), ("axes", self.axes), ("stacked", self.stacked))
            if value
        )
        where = f"{self.module.__name__} at {path_str(self.module_path)}"
        return f"VariableInfo({path_str(self.path)!r}, {shape}, {where}{extras})"


def variable_info(model: Module | Transformed) -> dict[str, Any]:
    """The metadata of every variable, in a tree of exactly the structure of ``variables``.

    Each leaf is a :class:`VariableInfo` (path, collection, stored shape and dtype, owning
    module's type and path, tags, logical axes, stacked axes). Filters
    (``mx.filter(variables, spec, info)``) read it to select by tag or module type; it also
    answers questions such as "how many parameters does the encoder have" without an array.

    One function for both worlds: for a model it describes the model as it is now; for the
    ``Transformed`` of ``mx.transform(model)`` it describes the snapshot (computed once and
    kept, so asking again costs a dict lookup). Nothing of it runs inside ``apply_fn``.

    Args:
        model: an ``mx.Module`` or the ``mx.Transformed`` that ``mx.transform`` returned.

    Returns:
        A nested dict ``{collection: {...: VariableInfo}}``: ``jax.tree.structure(info) ==
        jax.tree.structure(init_fn(key))``, so ``jax.tree.map(f, variables, info)`` pairs each
        array with its record.

    Raises:
        ModuleStructureError: when ``model`` is neither (or its attributes make no paths).

    Example:
        >>> import jax, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(3, 4), mx.LayerNorm(4))
        >>> model.layers[0].kernel.tags = "backbone"
        >>> info = mx.variable_info(model)
        >>> info["params"]["layers"]["0"]["kernel"].tags
        ('backbone',)
        >>> sum(i.size for i in jax.tree.leaves(info))
        24
    """
    if isinstance(model, Module):
        tree = walk(model)
        bound = [BoundVariable(p, v, tree.axes.get(p, ())) for p, v in tree.variables]
        return _info_tree(bound, tree.owners)
    owner = getattr(getattr(model, "init", None), "__self__", None)
    if isinstance(model, tuple) and isinstance(owner, Snapshot):
        if owner.info is None:
            owner.info = _info_tree(owner.variables, owner.owners)
        return owner.info
    raise errors.ModuleStructureError(
        f"mx.variable_info takes an mx.Module or the mx.Transformed that mx.transform(model) "
        f"returns, got {type(model).__name__}. Pass the model (or its transform)."
    )


def _info_tree(
    bound: list[BoundVariable], owners: dict[Path, tuple[Path, tuple[type[Module], ...]]]
) -> dict[str, Any]:
    flat: dict[Path, VariableInfo] = {}
    for b in bound:
        var = b.variable
        module_path, types = owners[b.path]
        stacked = tuple(a.size for a in b.axes)
        axes = None if var.axes is None else (*(None for _ in stacked), *var.axes)
        flat[b.path] = VariableInfo(
            b.path,
            var.collection,
            b.shape,
            var.dtype,
            types[-1],
            module_path,
            types,
            var.tags,
            axes,
            stacked,
            var.mutable,
        )
    nested = unflatten_variables(flat)
    leaves, treedef = tree_flatten(nested)  # sorted keys, as init_fn returns them
    return tree_unflatten(treedef, leaves)
