"""The analysis of a model: its unique modules and variables, each at its first path."""

from __future__ import annotations

import types
from typing import Any, NamedTuple

from metoryx import errors
from metoryx._core.module import Module, holds_modules_or_variables, iter_children
from metoryx._core.paths import Path, path_str
from metoryx._core.variables import Variable


class ModuleTree(NamedTuple):
    """Unique modules (by attribute path) and variables (by collection-first path), in order."""

    modules: list[tuple[Path, Module]]
    variables: list[tuple[Path, Variable]]

    def copy_memo(self) -> dict[int, Any]:
        """A ``copy.deepcopy`` memo that keeps immutable leaves of the model by reference.

        Fixed values are JAX arrays (copying one would duplicate device memory), and callables
        held as configuration (``mx.relu``, a jitted function) would come back as look-alike
        copies whose identity differs in traced programs. Bound methods are copied, so that
        they bind to the copied module.
        """
        memo: dict[int, Any] = {}
        for _, var in self.variables:
            if var._value is not None:
                memo[id(var._value)] = var._value
        for _, module in self.modules:
            for value in vars(module).values():
                items = value.values() if isinstance(value, dict) else value
                for item in items if isinstance(value, (list, tuple, dict)) else (value,):
                    if _shareable(item):
                        memo[id(item)] = item
        return memo


def _shareable(value: Any) -> bool:
    return (
        callable(value)
        and not isinstance(value, (Module, type, types.MethodType))
        and not holds_modules_or_variables(value)
    )


def walk(model: Module) -> ModuleTree:
    """Analyse ``model`` in attribute order.

    An object reachable along several paths is kept once, at its first path (weight tying by
    identity). A module that contains itself is an error.
    """
    if not isinstance(model, Module):
        raise errors.ModuleStructureError(
            f"Expected an mx.Module (a subclass instance such as mx.Dense(2, 3)), got "
            f"{type(model).__name__}. Wrap your layers in a class that subclasses mx.Module."
        )
    modules: list[tuple[Path, Module]] = []
    variables: list[tuple[Path, Variable]] = []
    seen: dict[int, Path] = {}
    active: set[int] = set()

    def visit(module: Module, path: Path) -> None:
        seen[id(module)] = path
        active.add(id(module))
        modules.append((path, module))
        for rel, child in iter_children(module):
            child_path = (*path, *rel)
            if id(child) in active:
                raise errors.ModuleStructureError(
                    f"{path_str(child_path)} refers back to its ancestor at "
                    f"{path_str(seen[id(child)])!r}: modules must form a tree (a shared "
                    f"sub-module is fine, a cycle is not). Remove the back reference, or keep "
                    f"it outside the module (e.g. pass it as an argument)."
                )
            if id(child) in seen:
                continue
            if isinstance(child, Variable):
                seen[id(child)] = child_path
                variables.append(((child.collection, *child_path), child))
            else:
                visit(child, child_path)
        active.discard(id(module))

    visit(model, ())
    return ModuleTree(modules, variables)
