"""How a layer's variables correspond to the ``state_dict`` entries of its PyTorch twin.

A layer describes its own layout by defining ``torch_conversions(self)``, which returns a list
of :class:`TorchConversion`: these torch entries (names relative to the layer, dotted) become
these variables (attribute paths relative to the layer, ``/``-joined), and back. A layer that
defines nothing maps each variable ``a/b`` to the entry ``a.b`` unchanged, and each sub-module
describes its own part. A conversion may name variables of sub-modules (``"query/kernel"``):
the layer then owns their layout, and the sub-module's own description of them is not used.
This is how attention maps PyTorch's fused ``in_proj_weight`` onto three ``Dense`` layers.

:func:`torch_conversions` gives the full list for any module, which is what
:mod:`metoryx.interop.torch` uses, and what a wrapper layer builds on (it renames the entries
of the layer it wraps).

This vocabulary sits below the layers (``metoryx/nn/``) and the adapters
(``metoryx/interop/``), which both use it, so that importing a layer does not import an adapter.
It is public as ``mx.layout``.

Example:
    >>> import metoryx as mx
    >>> class Scale(mx.Module):
    ...     def __init__(self, size):
    ...         self.gain = mx.Parameter(mx.initializers.ones, (size,))
    ...     def torch_conversions(self):  # PyTorch calls it "alpha"
    ...         return [mx.layout.same("alpha", "gain")]
    >>> [c.torch_keys for c in mx.layout.torch_conversions(Scale(4))]
    [('alpha',)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from metoryx import errors
from metoryx._core.module import Module, iter_children
from metoryx._core.variables import Variable

__all__ = [
    "TorchConversion",
    "fused",
    "metoryx_only",
    "same",
    "torch_conversions",
    "torch_only",
    "transposed",
]


@dataclasses.dataclass(frozen=True)
class TorchConversion:
    """Some PyTorch ``state_dict`` entries of a layer and the variables they become.

    Args:
        torch_keys: the entries' names relative to the layer, e.g. ``("weight",)`` or
            ``("in_proj_weight",)``.
        variables: the variables' attribute paths relative to the layer, e.g. ``("kernel",)``
            or ``("query/kernel", "key/kernel", "value/kernel")``. Empty for an entry PyTorch
            keeps and metoryx does not (``num_batches_tracked``).
        to_metoryx: ``f(*torch_arrays) -> tuple`` of the variables' arrays, in order. Receives
            NumPy arrays in the order of ``torch_keys``.
        to_torch: ``f(*variable_arrays) -> tuple`` of the entries' arrays: the inverse.

    Example:
        >>> import numpy as np
        >>> import metoryx as mx
        >>> weight = mx.layout.TorchConversion(
        ...     ("weight",), ("kernel",), lambda w: (w.T,), lambda k: (k.T,)
        ... )
        >>> weight.to_metoryx(np.zeros((4, 3)))[0].shape
        (3, 4)
    """

    torch_keys: tuple[str, ...]
    variables: tuple[str, ...]
    to_metoryx: Callable[..., tuple[Any, ...]]
    to_torch: Callable[..., tuple[Any, ...]]

    def renamed(self, torch_prefix: str, variable_prefix: str) -> TorchConversion:
        """The same conversion with both kinds of names under a parent's prefixes.

        Example:
            >>> import metoryx as mx
            >>> mx.layout.same("weight", "scale").renamed("norm.", "norm/").torch_keys
            ('norm.weight',)
        """
        return dataclasses.replace(
            self,
            torch_keys=tuple(torch_prefix + k for k in self.torch_keys),
            variables=tuple(variable_prefix + v for v in self.variables),
        )


def same(torch_key: str, variable: str) -> TorchConversion:
    """An entry that is the variable as it is, under another name.

    Example:
        >>> import numpy as np
        >>> import metoryx as mx
        >>> mx.layout.same("weight", "scale").to_metoryx(np.ones(3))[0].tolist()
        [1.0, 1.0, 1.0]
    """
    return TorchConversion((torch_key,), (variable,), _one, _one)


def transposed(torch_key: str, variable: str, axes: Sequence[int]) -> TorchConversion:
    """An entry whose axes are permuted: ``variable = np.transpose(entry, axes)``.

    Example:
        >>> import numpy as np
        >>> import metoryx as mx
        >>> # PyTorch's (O, I, H, W) -> our (H, W, I, O)
        >>> conv = mx.layout.transposed("weight", "kernel", (2, 3, 1, 0))
        >>> conv.to_metoryx(np.zeros((8, 3, 5, 5)))[0].shape
        (5, 5, 3, 8)
    """
    axes = tuple(axes)
    inverse = tuple(int(i) for i in np.argsort(axes))
    return TorchConversion(
        (torch_key,),
        (variable,),
        lambda a: (np.transpose(a, axes),),
        lambda a: (np.transpose(a, inverse),),
    )


def fused(
    torch_key: str, variables: Sequence[str], sizes: Sequence[int], transpose: bool
) -> TorchConversion:
    """One entry holding several projections concatenated on its output axis.

    With ``transpose`` the entry is a ``torch.nn.Linear``-style weight ``(sum(sizes), in)``
    (``torch.nn.MultiheadAttention``'s ``in_proj_weight``), split on axis 0 and each part
    transposed into an ``(in, size)`` kernel; without, it is split on its last axis as it is
    (a bias, or a ``Conv1D`` weight ``(in, sum(sizes))``).

    Example:
        >>> import numpy as np
        >>> import metoryx as mx
        >>> qkv = mx.layout.fused("c_attn.weight", ["q", "k", "v"], (4, 2, 2), transpose=False)
        >>> [a.shape for a in qkv.to_metoryx(np.zeros((3, 8)))]
        [(3, 4), (3, 2), (3, 2)]
    """
    splits = list(np.cumsum(sizes)[:-1])
    part: Callable[[np.ndarray], np.ndarray] = np.transpose if transpose else np.asarray

    def to_metoryx(stacked: np.ndarray) -> tuple[np.ndarray, ...]:
        if stacked.shape[0 if transpose else -1] != sum(sizes):
            raise ValueError("the fused axis does not hold the projections")  # a shape report
        return tuple(part(p) for p in np.split(stacked, splits, axis=0 if transpose else -1))

    def to_torch(*parts: np.ndarray) -> tuple[np.ndarray]:
        return (np.concatenate([part(p) for p in parts], axis=0 if transpose else -1),)

    return TorchConversion((torch_key,), tuple(variables), to_metoryx, to_torch)


def torch_only(torch_key: str, value: Any) -> TorchConversion:
    """An entry PyTorch keeps and metoryx does not: ignored on load, written as ``value``.

    Example:
        >>> import numpy as np
        >>> import metoryx as mx
        >>> mx.layout.torch_only("num_batches_tracked", np.array(0)).to_torch()
        (array(0),)
    """
    return TorchConversion((torch_key,), (), lambda _: (), lambda: (np.asarray(value),))


def metoryx_only(variable: str, value: Any) -> TorchConversion:
    """A variable PyTorch does not keep (e.g. a decoding cache): ``value`` on load, no entry
    written.

    Example:
        >>> import numpy as np
        >>> import metoryx as mx
        >>> mx.layout.metoryx_only("cache_index", np.array(0)).to_metoryx()
        (array(0),)
    """
    return TorchConversion((), (variable,), lambda: (np.asarray(value),), lambda _: ())


def torch_conversions(module: Module) -> list[TorchConversion]:
    """Every conversion of ``module``'s sub-tree, names relative to ``module``.

    The module's own ``torch_conversions()`` first, then, for each attribute in order, its
    unclaimed variables unchanged (``a/b`` <-> ``a.b``) and its sub-modules' conversions
    under their names. A sub-module reachable along two paths is listed at both, as PyTorch
    lists a shared module's entries under each name. A layer whose conversions name any
    variable of a sub-module owns that sub-module's whole layout (its PyTorch-only entries
    too): none of the sub-module's own conversions is added.

    Raises:
        ModuleStructureError: if a layer converts only some of the variables of one of its
            sub-modules, or names a variable it does not have.

    Example:
        >>> import metoryx as mx
        >>> [c.torch_keys for c in mx.layout.torch_conversions(mx.Dense(3, 4))]
        [('weight',), ('bias',)]
    """
    own_method = getattr(module, "torch_conversions", None)
    own = list(own_method()) if own_method is not None else []
    claimed = {v for c in own for v in c.variables}
    found = set()
    result = list(own)
    for rel, child in iter_children(module):
        name = "/".join(rel)
        if isinstance(child, Variable):
            found.add(name)
            if name not in claimed:
                result.append(same(".".join(rel), name))
            continue
        described = [c.renamed(".".join(rel) + ".", name + "/") for c in torch_conversions(child)]
        variables = [v for c in described for v in c.variables]
        found.update(variables)
        unclaimed = [v for v in variables if v not in claimed]
        if len(unclaimed) == len(variables):
            result.extend(described)
        elif unclaimed:
            raise errors.ModuleStructureError(
                f"{type(module).__name__}.torch_conversions names some variables of its "
                f"sub-module {name!r} but not {unclaimed}. A layer that converts part of a "
                f"sub-module owns its whole layout: build on torch_conversions(self.{rel[0]}) "
                f"and rename its entries (TorchConversion.renamed)."
            )
    unknown = sorted(claimed - found)
    if unknown:
        raise errors.ModuleStructureError(
            f"{type(module).__name__}.torch_conversions names variables it does not have: "
            f"{unknown}. Name each by its attribute path relative to the layer, e.g. "
            f"'kernel' or 'query/kernel'."
        )
    return result


def _one(a: Any) -> tuple[Any]:
    return (a,)
