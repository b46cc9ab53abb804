"""Surgery in the definition world: find a model's sub-modules, replace some of them.

``mx.modules(model)`` lists every module with its path, as ``mx.transform`` sees them;
``mx.replace(model, where, fn)`` returns a copy in which the modules that ``where`` picks are
replaced by what ``fn`` makes of them: swap every ``BatchNorm`` for a ``GroupNorm``, put a new
head on a pretrained body, wrap layers in adapters. Both read the model with the core's own
analysis (``tree.walk``), so their paths and their idea of tied modules are the snapshot's.
"""

from __future__ import annotations

import builtins
import copy
import difflib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import numpy as np

from metoryx import errors
from metoryx._core.module import Module
from metoryx._core.paths import Path, glob_matcher, glob_problem, path_str
from metoryx._core.tree import walk
from metoryx._core.variables import Variable

M = TypeVar("M", bound=Module)

#: What ``mx.replace`` accepts as ``where``: module classes, a path glob, or a predicate.
Where = (
    builtins.type[Module] | tuple[builtins.type[Module], ...] | str | Callable[..., bool | np.bool_]
)


@overload
def modules(model: Module, type: None = None) -> Iterator[tuple[Path, Module]]: ...


@overload
def modules(model: Module, type: builtins.type[M]) -> Iterator[tuple[Path, M]]: ...


@overload
def modules(
    model: Module, type: tuple[builtins.type[Module], ...]
) -> Iterator[tuple[Path, Module]]: ...


def modules(model: Module, type: Any = None) -> Iterator[tuple[Path, Any]]:
    """Every module of ``model``, the model included, with its path: ``(path, module)`` pairs.

    The order is attribute order, the one ``mx.transform`` uses (attributes as assigned, then
    list indices and dict keys), parents before their children. A path is a tuple of str,
    ``()`` for the model itself, ``("blocks", "0", "attn")`` for a module in a list. A module
    held at several paths (tied weights) comes once, at its first path.

    A lifted wrapper (``mx.Repeat``, ``mx.scan``, ``mx.vmap``, ``mx.checkpoint``) adds no path
    part: the wrapper and the module it wraps share a path (``("blocks",)`` for both
    ``model.blocks`` and ``model.blocks.module``). In the definition world ``mx.Repeat(block,
    n)`` holds one block, the template of its ``n`` copies, so that block comes once: the
    stacked copies exist only in the variables (on a leading axis).

    Args:
        model: the root module.
        type: None for every module, else a module class or a tuple of them: only the modules
            that are instances of it (subclasses included) are given.

    Returns:
        An iterator of ``(path, module)``; the modules are the model's own objects (edit them
        to edit the model).

    Raises:
        LayerConfigError: if ``type`` is neither None nor a module class or tuple of them.
        ModuleStructureError: if the model cannot be turned into paths (as in
            ``mx.transform``).

    Example:
        >>> import metoryx as mx
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.body = mx.MLP(4, [8], 8)
        ...         self.blocks = mx.Repeat(lambda: mx.LayerNorm(8), 3)
        ...         self.head = mx.Dense(8, 2)
        >>> for path, module in mx.modules(Net()):
        ...     print("/".join(path) or "<root>", type(module).__name__)
        <root> Net
        body MLP
        body/layers/0 Dense
        body/layers/1 Dense
        blocks Repeat
        blocks LayerNorm
        head Dense
        >>> [path for path, _ in mx.modules(Net(), mx.Dense)]
        [('body', 'layers', '0'), ('body', 'layers', '1'), ('head',)]
    """
    wanted = None if type is None else _module_classes(type)
    found = walk(model).modules
    return iter([(p, m) for p, m in found if wanted is None or isinstance(m, wanted)])


def replace(model: Module, where: Where, fn: Callable[[Path, Any], Module]) -> Module:
    """A copy of ``model`` in which every module that ``where`` picks is ``fn(path, module)``.

    ``model`` itself is left as it was. The copy is made as ``mx.transform`` makes its
    snapshot: fixed values (pretrained arrays) and functions held as configuration are shared,
    not duplicated. The modules are visited top down, in the order of :func:`modules`:

    - a module that matches is handed to ``fn`` (its copy, with everything it holds) and
      nothing inside it is searched; neither is what ``fn`` returns, so ``fn`` may wrap the
      module it gets (an adapter holding the old layer) without being called on it again;
    - a module held at several paths (tied) is matched once, at its first path, and its
      replacement takes its place at every path: the result stays tied;
    - the model itself may match: the result is then ``fn((), copy_of_model)``;
    - modules in lists, tuples (NamedTuples too) and dicts are replaced in place;
    - inside a lifted wrapper (``mx.Repeat(block, n)``, ``mx.scan``, ``mx.vmap``,
      ``mx.checkpoint``), the wrapped template can be replaced: the stacked variables follow
      the new template. As the wrapper and its template share a path, a glob naming that path
      picks the wrapper; pick the template by its class or with a predicate.

    Args:
        model: the root module.
        where: which modules to replace: a module class or a tuple of them (instances,
            subclasses included); a glob over module paths (``"head"``, ``"blocks/*/attn"``;
            a part ``*`` matches one level, ``**`` any number of levels, none included, so
            ``"encoder/**"`` picks ``encoder`` itself and ``"**"`` the model); or a predicate
            ``where(path, module) -> bool`` (it gets the module of ``model``: read it, do not
            edit it).
        fn: ``fn(path, module) -> new_module``, called once per match with the path and the
            copied module (``fn`` may keep it, e.g. inside an adapter, or drop it).

    Returns:
        The edited copy; to train it, ``mx.transform`` it (new layers start from their
        initializers, kept layers from the fixed values they carried).

    Raises:
        LayerConfigError: if ``where`` or ``fn`` is not one of the forms above, or a
            predicate returns something other than a bool.
        NoMatchError: if ``where`` matches no module; the message lists the near misses.
        ReplacementError: if ``fn`` returns something that is not a module.
        ModuleStructureError: if the model, or the result, cannot be turned into paths (a
            replacement that holds one of its ancestors, for instance).

    Example:
        >>> import jax, metoryx as mx
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.conv = mx.Conv(3, 8, kernel_size=(3, 3))
        ...         self.norm = mx.BatchNorm(8)
        ...         self.head = mx.Dense(8, 10)
        >>> net = Net()
        >>> grouped = mx.replace(net, mx.BatchNorm, lambda path, bn: mx.GroupNorm(2, bn.size))
        >>> type(grouped.norm).__name__, type(net.norm).__name__
        ('GroupNorm', 'BatchNorm')
        >>> new_head = mx.replace(net, "head", lambda path, old: mx.Dense(old.in_size, 5))
        >>> mx.init(new_head)(jax.random.key(0))["params"]["head"]["kernel"].shape
        (8, 5)
    """
    matches = where_matcher(where)
    _check_callable("fn", fn, "fn(path, module) -> new_module")
    tree = walk(model)
    memo = tree.copy_memo()
    handed: set[int] = set()  # the modules inside a matched one: fn got them with it
    for path, module in tree.modules:
        if id(module) in handed or not matches(path, module):
            continue
        new = fn(path, copy.deepcopy(module, memo))
        if not isinstance(new, Module):
            raise _not_a_module(path, module, new)
        handed.update(id(inner) for _, inner in walk(module).modules)
        # Every later copy of the model that reaches ``module`` now puts ``new`` there.
        memo[id(module)] = new
    if not handed:
        raise nothing_matched(where, tree.modules)
    result = copy.deepcopy(model, memo)
    walk(result)  # a replacement that breaks the tree is named here, not at mx.transform
    return result


# ---------------------------------------------------------------------------------------------
# Arguments


def _module_classes(value: Any) -> tuple[builtins.type[Module], ...]:
    """``type`` of :func:`modules` as a tuple of module classes."""
    classes: tuple[Any, ...] = value if isinstance(value, tuple) else (value,)
    if classes and all(_is_module_class(c) for c in classes):
        return classes
    raise errors.LayerConfigError(
        f"mx.modules: `type` must be None, a module class such as mx.Dense, or a tuple of "
        f"them, got {_shown(value)}.{_instance_hint(value)}"
    )


def where_matcher(
    where: Any, caller: str = "mx.replace", argument: str = "where"
) -> Callable[[Path, Module], bool]:
    """``where`` of :func:`replace` as a predicate ``(path, module) -> bool``; also the
    argument named ``argument`` of ``caller``, which takes the same forms (``mx.lora``'s
    ``target``, ``mx.set_precision``'s ``where``)."""
    if isinstance(where, str):
        problem = glob_problem(where)
        if problem:
            raise errors.LayerConfigError(f"{caller}: `{argument}` is not a path glob: {problem}.")
        match_path = glob_matcher(where)
        return lambda path, module: match_path(path)
    if isinstance(where, tuple) or isinstance(where, builtins.type):
        classes: tuple[Any, ...] = where if isinstance(where, tuple) else (where,)
        if classes and all(_is_module_class(c) for c in classes):
            return lambda path, module: isinstance(module, classes)
    elif callable(where) and not isinstance(where, Module):
        _check_callable(argument, where, f"{argument}(path, module) -> bool", caller)
        return _checked_predicate(where, caller, argument)
    raise errors.LayerConfigError(
        f"{caller}: `{argument}` must be a module class (mx.BatchNorm) or a tuple of them, a "
        f"path glob ('head', 'blocks/*/attn') or a predicate `lambda path, module: ...`, got "
        f"{_shown(where)}.{_instance_hint(where)}"
    )


def _checked_predicate(
    where: Callable[..., Any], caller: str, argument: str
) -> Callable[[Path, Module], bool]:
    def matches(path: Path, module: Module) -> bool:
        answer = where(path, module)
        if not isinstance(answer, (bool, np.bool_)):
            raise errors.LayerConfigError(
                f"{caller}: the `{argument}` predicate returned {_shown(answer)} for the "
                f"{type(module).__name__} at {path_str(path)!r}; it must return True or False "
                f"(e.g. `lambda path, m: isinstance(m, mx.Dense) and path[0] == 'encoder'`)."
            )
        return bool(answer)

    return matches


def _check_callable(name: str, value: Any, signature: str, caller: str = "mx.replace") -> None:
    """``value`` must be a function taking ``(path, module)``; a class is one only if it makes
    modules (``type(...)`` of anything else could never return one)."""
    problem = None
    if not callable(value) or isinstance(value, Module):
        problem = "is not a function"
    elif isinstance(value, builtins.type) and not issubclass(value, Module):
        problem = "is a class that does not make modules"
    else:
        try:
            inspect.signature(value).bind((), None)
        except TypeError:
            problem = "cannot be called with two arguments (path, module)"
        except ValueError:  # no signature to read (some builtins): trust it
            pass
    if problem:
        raise errors.LayerConfigError(
            f"{caller}: `{name}` must be a function `{signature}`, got {_shown(value)}, "
            f"which {problem}.{_instance_hint(value)}"
        )


def _is_module_class(value: Any) -> bool:
    return isinstance(value, builtins.type) and issubclass(value, Module)


def _shown(value: Any) -> str:
    name = builtins.type(value).__name__
    if isinstance(value, (Module, Variable)):  # their repr spans lines: the class says enough
        return f"a {name}"
    return f"{name} {value!r:.60}"


def _instance_hint(value: Any) -> str:
    if not isinstance(value, Module):
        return ""
    name = builtins.type(value).__name__
    return (
        f" Pass its class ({name}) to pick every {name}, or pick this very module with "
        f"`lambda path, m: m is layer`."
    )


# ---------------------------------------------------------------------------------------------
# Errors


def _not_a_module(path: Path, module: Module, new: Any) -> errors.ReplacementError:
    return errors.ReplacementError(
        f"mx.replace: `fn` returned {_shown(new)} for the {builtins.type(module).__name__} at "
        f"{path_str(path)!r}; it must return an mx.Module, the layer to put there. To remove a "
        f"layer, return mx.Identity(); to keep it, return the module fn was given."
    )


def nothing_matched(
    where: Any, found: list[tuple[Path, Module]], caller: str = "mx.replace"
) -> errors.NoMatchError:
    """The NoMatchError of a ``where`` (as :func:`where_matcher` reads it) that picked none of
    the modules ``found``, with the near misses: the closest paths, or the classes held."""
    counts = Counter(builtins.type(m).__name__ for _, m in found)
    held = ", ".join(f"{name} ({n})" for name, n in counts.items())
    if isinstance(where, str):
        paths = [path_str(p) for p, _ in found if p]
        close = difflib.get_close_matches(where, paths, n=5, cutoff=0.5)
        listed = close or paths[:8]
        kind = "the closest paths" if close else "its module paths begin"
        why = (
            f"the glob {where!r} matched no module path; {kind}: {', '.join(listed) or 'none'}. "
            f"A module held at several paths is matched at its first one, as mx.modules lists "
            f"it"
        )
    elif callable(where) and not isinstance(where, (builtins.type, tuple)):
        why = f"the predicate returned False for all {len(found)} modules ({held})"
    else:
        classes = where if isinstance(where, tuple) else (where,)
        names = " or ".join(c.__name__ for c in classes)
        why = f"no module is a {names}; the model holds {held}"
    return errors.NoMatchError(
        f"{caller}: `where` matched nothing: {why}. mx.modules(model) lists every module "
        f"with its path."
    )
