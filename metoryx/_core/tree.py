"""The analysis of a model: its unique modules and variables, each at its first path."""

from __future__ import annotations

import types
from typing import Any, NamedTuple, cast

from metoryx import errors
from metoryx._core.context import StackAxis
from metoryx._core.module import Lifted, Module, holds_modules_or_variables, iter_children
from metoryx._core.paths import Path, path_str
from metoryx._core.variables import Variable


class ModuleTree(NamedTuple):
    """Unique modules (by attribute path) and variables (by collection-first path), in order.

    ``axes`` gives the stacked axes of the variables that lifted wrappers (``mx.Repeat``,
    ``mx.vmap``, ...) copy, by path; the other variables are absent from it. ``owners`` gives,
    by variable path, the path of the module holding it and the types of the modules from the
    root down to that one.
    """

    modules: list[tuple[Path, Module]]
    variables: list[tuple[Path, Variable]]
    axes: dict[Path, tuple[StackAxis, ...]]
    owners: dict[Path, tuple[Path, tuple[type[Module], ...]]]

    def copy_memo(self) -> dict[int, Any]:
        """A ``copy.deepcopy`` memo that keeps immutable leaves of the model by reference.

        Fixed values are JAX arrays (copying one would duplicate device memory), and callables
        held as configuration (``mx.relu``, a jitted function) would come back as look-alike
        copies whose identity differs in traced programs. Bound methods are copied, so that
        they bind to the copied module.
        """
        memo: dict[int, Any] = {}
        for _, var in self.variables:
            if var.has_value:
                memo[id(var.value)] = var.value
        for _, module in self.modules:
            for value in vars(module).values():
                # The cast: isinstance gives the dict's values an Unknown type.
                items = cast("dict[Any, Any]", value).values() if isinstance(value, dict) else value
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
    axes: dict[Path, tuple[StackAxis, ...]] = {}
    owners: dict[Path, tuple[Path, tuple[type[Module], ...]]] = {}
    seen: dict[int, Path] = {}
    # Each object's chain of enclosing lifted wrappers: an object inside one is copied or
    # mapped with it, so it cannot also be used outside (nor inside another).
    chain_of: dict[int, tuple[Path, ...]] = {}
    active: set[int] = set()

    def visit(
        module: Module,
        path: Path,
        lifts: tuple[tuple[Path, Lifted], ...],
        types: tuple[type[Module], ...],
    ) -> None:
        types = (*types, type(module))
        if isinstance(module, Lifted) and module.isolates():
            lifts = (*lifts, (path, module))
        chain = tuple(p for p, _ in lifts)
        seen[id(module)] = path
        chain_of[id(module)] = chain
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
                if chain_of[id(child)] != chain:
                    raise _shared_across_lifts(child, child_path, seen[id(child)])
                continue
            if isinstance(child, Variable):
                full = (child.collection, *child_path)
                seen[id(child)] = child_path
                chain_of[id(child)] = chain
                variables.append((full, child))
                owners[full] = (path, types)
                stacked = _stack_axes(child, lifts)
                if stacked:
                    axes[full] = stacked
            else:
                visit(child, child_path, lifts, types)
        active.discard(id(module))

    visit(model, (), (), ())
    return ModuleTree(modules, variables, axes, owners)


def _stack_axes(var: Variable, lifts: tuple[tuple[Path, Lifted], ...]) -> tuple[StackAxis, ...]:
    """The copy axes of ``var`` from its enclosing wrappers, outermost first.

    Each axis's ``at`` is where its index goes into the path once the outer indices are in:
    copy ``(i, j)`` of ``params/outer/inner/kernel`` has the path
    ``params/outer/i/inner/j/kernel``.
    """
    found: list[StackAxis] = []
    for owner, lifted in lifts:
        size = lifted.copies(var.collection)
        if size is not None:
            found.append(StackAxis(owner, 1 + len(owner) + len(found), size))
    return tuple(found)


def _shared_across_lifts(child: Any, path: Path, first: Path) -> errors.ModuleStructureError:
    kind = "variable" if isinstance(child, Variable) else "module"
    return errors.ModuleStructureError(
        f"{path_str(path)}: this {kind} is also reachable at {path_str(first)!r}, on the other "
        f"side of a lifted wrapper (mx.Repeat, mx.scan, mx.vmap, mx.checkpoint). What a wrapper "
        f"holds is copied, mapped or rematerialized with it, so it cannot also be used from "
        f"outside it. Give each side its own {kind}, or move the shared one inside the wrapper."
    )
