"""Tags in the definition world: ``mx.tag``, ``mx.untag``, ``mx.freeze``, ``mx.unfreeze``.

A tag is a name on a variable (``variable.tags``) that filters select by
(``mx.filters.tag("backbone")``). These helpers tag every variable of a module and its
sub-modules at once; they change the model in place, before ``mx.transform``, which snapshots
the tags with the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, cast

from metoryx import errors
from metoryx._core.module import Module
from metoryx._core.tree import walk
from metoryx._core.variables import Variable, tags_argument
from metoryx.filters import FROZEN

Target = TypeVar("Target")


def _variables(target: Any, what: str) -> list[Variable]:
    """The variables of a module (sub-modules included), a variable, or a list, tuple or dict
    of those (``model.blocks``), each once."""
    if isinstance(target, Variable):
        return [target]
    if isinstance(target, Module):
        return [v for _, v in walk(target).variables]
    if isinstance(target, (list, tuple, dict)) and target:
        items = cast("dict[Any, Any]", target).values() if isinstance(target, dict) else target
        found = {id(v): v for item in cast("Iterable[Any]", items) for v in _variables(item, what)}
        return list(found.values())
    raise errors.ModuleStructureError(
        f"{what} takes a module (all its variables, sub-modules included), a variable, or a "
        f"non-empty list, tuple or dict of them, got {type(target).__name__} {target!r:.40}. "
        f"Pass e.g. model.encoder or model.fc.kernel."
    )


def tag(target: Target, *tags: str) -> Target:
    """Add ``tags`` to every variable of ``target``; return ``target``.

    ``target`` is a module (its sub-modules included), a variable, or a list, tuple or dict
    of them (``model.blocks``). Tags are names that filters select by
    (``mx.filters.tag(name)``); they are set in the definition world, before ``mx.transform``.

    Example:
        >>> import metoryx as mx
        >>> model = mx.Sequential(mx.Dense(2, 3), mx.Dense(3, 1))
        >>> _ = mx.tag(model.layers[0], "backbone")
        >>> model.layers[0].kernel.tags, model.layers[1].kernel.tags
        (('backbone',), ())
    """
    if not tags:
        raise errors.VariableDefinitionError(
            "mx.tag(target, *tags) needs at least one tag, e.g. mx.tag(model.encoder, 'backbone')."
        )
    added = tags_argument("mx.tag", tags)
    for var in _variables(target, "mx.tag"):
        var.tags = (*var.tags, *added)
    return target


def untag(target: Target, *tags: str) -> Target:
    """Remove ``tags`` from every variable of ``target`` that has them; return ``target``.

    Example:
        >>> import metoryx as mx
        >>> layer = mx.tag(mx.Dense(2, 3), "backbone", "slow")
        >>> mx.untag(layer, "slow").kernel.tags
        ('backbone',)
    """
    removed = set(tags_argument("mx.untag", tags))
    for var in _variables(target, "mx.untag"):
        var.tags = tuple(t for t in var.tags if t not in removed)
    return target


def freeze(target: Target) -> Target:
    """Mark every variable of ``target`` as frozen (the tag ``"frozen"``); return ``target``.

    The PyTorch ``requires_grad_(False)`` of metoryx. Freezing is a tag, read when you split
    the variables: ``mx.partition(variables, mx.filters.trainable, info)`` leaves frozen
    variables out of the part you differentiate and optimize, so they get no gradient, no
    optimizer state and no weight decay (see the fine-tuning guide). BatchNorm statistics are
    not parameters; keep them fixed with ``mx.set_training(module, False)``.

    Example:
        >>> import jax, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(2, 3), mx.Dense(3, 1))
        >>> _ = mx.freeze(model.layers[0])
        >>> variables = mx.init(model)(jax.random.key(0))
        >>> trainable, frozen = mx.partition(variables, mx.filters.trainable,
        ...                                  mx.variable_info(model))
        >>> sorted(trainable["params"]["layers"]), sorted(frozen["params"]["layers"])
        (['1'], ['0'])
    """
    return tag(target, FROZEN)


def unfreeze(target: Target) -> Target:
    """Undo :func:`freeze`: remove the ``"frozen"`` tag; return ``target``.

    Example:
        >>> import metoryx as mx
        >>> mx.unfreeze(mx.freeze(mx.Dense(2, 3))).kernel.tags
        ()
    """
    return untag(target, FROZEN)
