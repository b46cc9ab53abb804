"""``Module``: a plain mutable object in the definition world, a frozen view in the execution one.

A definition-world module stores everything in its ``__dict__`` like any Python object. The
snapshot that ``mx.transform`` makes is bound: its variable attributes are moved out of
``__dict__`` into templates (see ``context.py``), so ``__getattr__``, which Python calls only
for names missing from ``__dict__``, turns them into arrays from the running frame. Config
attributes and sub-modules stay in ``__dict__`` and are read at plain attribute speed.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast

import jax
import numpy as np

from metoryx import errors
from metoryx._core.context import FRAMES, Frame, Slot
from metoryx._core.paths import Path, key_str, part_problem, path_str
from metoryx._core.variables import Variable

# The key under which a snapshot module keeps its Binding; never present in the definition world.
BINDING = "_mx_binding"


class Binding(NamedTuple):
    """What makes a snapshot module a view: its owner, its path and its templated attributes."""

    owner: object
    path: Path
    templates: dict[str, Any]


class Module:
    """Base class of every model and layer.

    A module is an ordinary Python object: assign sub-modules, variables
    (:class:`~metoryx.Parameter`, :class:`~metoryx.State`), lists/tuples/dicts of them and any
    configuration in ``__init__``; replace, add or delete them later as you like. Calling
    ``super().__init__()`` is allowed and not required. ``mx.transform(model)`` snapshots the
    module into pure functions; inside them, variable attributes read as ``jax.Array``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class MLP(mx.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = [mx.Dense(4, 8), mx.Dense(8, 2)]
        ...     def __call__(self, x):
        ...         return self.layers[1](mx.relu(self.layers[0](x)))
        >>> init_fn, apply_fn = mx.transform(MLP())
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["layers"]["0"]["kernel"].shape
        (4, 8)
        >>> y, _ = apply_fn(variables, None, jnp.ones((3, 4)))
        >>> y.shape
        (3, 2)
    """

    # The attribute holding a module that sits at this module's own path: the lifted
    # wrappers (mx.Repeat, mx.vmap, ...) put their template's variables where a user expects
    # them (``blocks/kernel``, not ``blocks/module/kernel``). None for ordinary modules.
    _transparent: ClassVar[str | None] = None

    if TYPE_CHECKING:
        # For type checkers only: every module may be called, with its own signature, so
        # wrappers that hold "some Module" (Sequential, Repeat, WeightNorm) type-check their
        # calls. At run time a module without __call__ stays not callable.
        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __init__(self) -> None:
        """Nothing to set up: a module's state is its attributes."""

    def __getattr__(self, name: str) -> Any:
        # Reached only for names missing from __dict__: a snapshot's variable attributes.
        binding = self.__dict__.get(BINDING)
        if binding is not None:
            template = binding.templates.get(name)
            if template is not None:
                frame = FRAMES.get().get(binding.owner)
                if frame is None:
                    raise _outside_apply(self, name)
                if type(template) is Slot:
                    return frame.values[template.index]
                return frame.read(template, f"{module_label(self)}.{name}")
        raise _missing_attribute(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        binding = self.__dict__.get(BINDING)
        if binding is None:
            object.__setattr__(self, name, value)
            return
        where = f"{module_label(self)}.{name}"
        template = binding.templates.get(name)
        if template is None and holds_modules_or_variables(value):
            raise errors.ImmutableModuleError(
                f"Cannot set attribute {name!r} of {module_label(self)} inside apply_fn to "
                f"{_kind_of(value)}: layers and variables are part of the model's structure, "
                f"which mx.transform fixes before apply_fn runs (their variables must exist "
                f"for init_fn). Create it in __init__ (`self.{name} = ...`) and only call it "
                f"here."
            )
        if template is None:
            raise errors.ImmutableModuleError(
                f"Cannot set attribute {name!r} of {module_label(self)} inside apply_fn: the "
                f"model is frozen while it runs, so that every call is a pure function. To keep "
                f"a value across calls, declare it in __init__ as a mutable state, e.g. "
                f"`self.{name} = mx.State('state', mx.initializers.zeros, shape)`, and assign "
                f"it here; to pass a value between methods, return it instead."
            )
        frame = FRAMES.get().get(binding.owner)
        if frame is None:
            raise _outside_apply(self, name)
        frame.write(where, template, value)

    def __delattr__(self, name: str) -> None:
        if BINDING in self.__dict__:
            raise errors.ImmutableModuleError(
                f"Cannot delete attribute {name!r} of {module_label(self)} inside apply_fn: the "
                f"model is frozen while it runs. Edit the model before mx.transform instead."
            )
        object.__delattr__(self, name)

    def extra_repr(self) -> str:
        """The configuration shown in ``print(model)``, e.g. ``"in_size=3, out_size=4"``.

        Override it in layers; the default shows nothing.

        Example:
            >>> import metoryx as mx
            >>> mx.Dense(3, 4).extra_repr()
            'in_size=3, out_size=4, use_bias=True'
        """
        return ""

    def __repr__(self) -> str:
        totals = _Totals()
        lines = _repr_lines(self, (), {}, set(), (), totals)
        return "\n".join([*lines, totals.line()])


def module_label(module: Module) -> str:
    """How error messages name a module: ``"Dense at 'fc1'"`` inside apply_fn, else ``"Dense"``.

    Args:
        module: any module.

    Returns:
        The class name, with the module's path when it is part of a running snapshot.

    Example:
        >>> import metoryx as mx
        >>> from metoryx._core.module import module_label
        >>> module_label(mx.Dense(2, 3))
        'Dense'
    """
    binding = module.__dict__.get(BINDING)
    name = type(module).__name__
    if binding is None:
        return name
    if not binding.path:
        return f"{name} (root)"
    return f"{name} at {path_str(binding.path)!r}"


def running_frame(module: Module) -> tuple[Binding, Frame] | None:
    """The binding of a snapshot module and its snapshot's current frame; None when the module
    is not part of a running ``apply_fn``."""
    binding: Binding | None = module.__dict__.get(BINDING)
    frame = None if binding is None else FRAMES.get().get(binding.owner)
    return None if binding is None or frame is None else (binding, frame)


def calling_module() -> Module | None:
    """The innermost bound module whose method is on the call stack.

    Used where the happy path must not pay for knowing which layer is running: error messages
    (a missing rng key inside a function such as ``dropout``) and ``mx.sow`` while capturing.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Module) and BINDING in candidate.__dict__:
            return candidate
        frame = frame.f_back
    return None


def calling_module_label() -> str | None:
    """The label of :func:`calling_module`, for error messages; None outside module code."""
    module = calling_module()
    return None if module is None else module_label(module)


def function_label(name: str) -> str:
    """How error messages name a function such as ``max_pool``: with the layer calling it.

    ``"max_pool in Net at 'encoder'"`` when called from a module's method inside apply_fn, else
    just ``"max_pool"``. Error paths only: it walks the call stack.
    """
    caller = calling_module_label()
    return name if caller is None else f"{name} in {caller}"


def _missing_attribute(module: Module, name: str) -> errors.ModuleAttributeError:
    label = module_label(module)
    if name.startswith("__") and name.endswith("__"):  # Python's own probes: keep it short
        return errors.ModuleAttributeError(f"{label} has no attribute {name!r}.")
    if label == type(module).__name__:  # the definition world
        return errors.ModuleAttributeError(
            f"{label} has no attribute {name!r}: it was never set, or deleted (`del "
            f"layer.{name}`). Set it (e.g. in __init__: `self.{name} = ...`) before reading it."
        )
    return errors.ModuleAttributeError(
        f"{label} has no attribute {name!r}, which its code reads: it was deleted from the "
        f"model (`del layer.{name}`) or never set before mx.transform. Set it on the model and "
        f"transform again (None where the layer takes None, e.g. a bias), or build the layer "
        f"with the options you want (e.g. use_bias=False)."
    )


def _kind_of(value: Any) -> str:
    if isinstance(value, Module):
        return f"a module ({type(value).__name__})"
    if isinstance(value, Variable):
        return f"a variable ({value!r})"
    return f"a {type(value).__name__} holding modules or variables"


def _outside_apply(module: Module, name: str) -> errors.ApplyContextError:
    return errors.ApplyContextError(
        f"{module_label(module)}.{name} was read outside apply_fn. A transformed model's arrays "
        f"exist only while apply_fn runs; call apply_fn(variables, rngs, ...) and do the work "
        f"inside the model's methods."
    )


# ---------------------------------------------------------------------------------------------
# Children: the modules and variables a module holds, in attribute order, with relative paths.

_OPAQUE = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    np.ndarray,
    np.generic,
    jax.Array,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
)


def iter_children(module: Module) -> Iterator[tuple[Path, Module | Variable]]:
    """Yield ``(relative_path, child)`` for every Module and Variable held by ``module``.

    Walks attributes in assignment order and lists, tuples and dicts inside them. Raises
    :class:`~metoryx.errors.ModuleStructureError` for a module or variable hidden where paths
    cannot reach (a set, a dict key that is not a str or int, a non-Module object) and for two
    dict keys that would give the same path.
    """
    transparent = type(module)._transparent
    for name, value in vars(module).items():
        if name == transparent and isinstance(value, Module):
            yield (), value
        elif name != BINDING:
            found = list(_scan(value, (name,), module))
            problem = part_problem(name) if found else None
            if problem:
                raise _bad_part(module, (), f"attribute {name!r}", problem)
            yield from found


def _scan(value: Any, path: Path, owner: Module) -> Iterator[tuple[Path, Module | Variable]]:
    # isinstance gives the containers Unknown items: the casts say Any.
    if isinstance(value, (Module, Variable)):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(cast("Iterable[Any]", value)):
            yield from _scan(item, (*path, str(i)), owner)
    elif isinstance(value, dict):
        used: dict[str, Any] = {}
        for key, item in cast("dict[Any, Any]", value).items():
            part = key_str(key)
            if part is None:
                if holds_modules_or_variables(item):
                    raise _hidden(
                        owner, path, f"dict key {key!r} (only str and int keys make paths)"
                    )
                continue
            found = list(_scan(item, (*path, part), owner))
            problem = part_problem(part) if found else None
            if problem:
                raise _bad_part(owner, path, f"dict key {key!r}", problem)
            if found and part in used:
                raise errors.ModuleStructureError(
                    f"{type(owner).__name__}.{path_str(path)}: keys {used[part]!r} and {key!r} "
                    f"both give the path {path_str((*path, part))!r}. Paths name variables in "
                    f"checkpoints, so they must be unique: rename one key."
                )
            used[part] = key
            yield from found
    elif holds_modules_or_variables(value):
        raise _hidden(owner, path, f"a {type(value).__name__}")


def holds_modules_or_variables(value: Any, depth: int = 4) -> bool:
    """Whether a Module or Variable sits inside ``value`` (a few levels deep)."""
    if isinstance(value, (Module, Variable)):
        return True
    if depth == 0 or isinstance(value, _OPAQUE):
        return False
    # isinstance gives the containers Unknown items: the casts say Any.
    if isinstance(value, dict):
        entries = cast("dict[Any, Any]", value)
        items = list(entries.values()) + list(entries.keys())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(cast("Iterable[Any]", value))
    else:
        attrs = getattr(value, "__dict__", None)
        items = list(cast("dict[Any, Any]", attrs).values()) if isinstance(attrs, dict) else []
        items += _slot_values(value)
    return any(holds_modules_or_variables(item, depth - 1) for item in items)


def _slot_values(value: Any) -> list[Any]:
    """The attributes an object keeps in ``__slots__`` (which ``__dict__`` does not show)."""
    found: list[Any] = []
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                found.append(getattr(value, name))
    return found


def _bad_part(owner: Module, path: Path, what: str, problem: str) -> errors.ModuleStructureError:
    where = f"{type(owner).__name__}.{path_str(path)}" if path else type(owner).__name__
    return errors.ModuleStructureError(
        f"{where}: the {what} holds modules or variables, and a path part must be a "
        f"non-empty name without '/' or '.'; got {problem}. Rename it (e.g. 'a_b' for "
        f"'a/b'), or nest the dicts ({{'a': {{'b': ...}}}})."
    )


def _hidden(owner: Module, path: Path, container: str) -> errors.ModuleStructureError:
    return errors.ModuleStructureError(
        f"{type(owner).__name__}.{path_str(path)}: a module or variable is held inside "
        f"{container}, where metoryx cannot give it a path, so it would be silently left out "
        f"of the variables. Hold modules and variables directly, or in lists, tuples or dicts "
        f"with str or int keys (or make the holder an mx.Module)."
    )


# ---------------------------------------------------------------------------------------------
# Lifted wrappers: the one kind of module the tree analysis and print(model) treat specially.


class Lifted(Module):
    """Base of the wrappers that run one module, ``self.module``, under a JAX transformation.

    The wrapped module sits at the wrapper's own path (``blocks/kernel``, not
    ``blocks/module/kernel``). A subclass that keeps a copy of the module's variables per layer
    or member says how many, per collection, with :meth:`copies`; those variables are stacked
    on a new leading axis. The wrappers themselves are in ``metoryx/lift/``; their machinery in
    ``lifting.py``.
    """

    _transparent = "module"
    module: Module

    def copies(self, collection: str) -> int | None:
        """How many copies of the variables of ``collection`` are stacked; None: shared."""
        return None

    def isolates(self) -> bool:
        """Whether it stacks some variables, so that what it holds cannot be shared outside."""
        return False


# ---------------------------------------------------------------------------------------------
# print(model): one walk gives the lines and the totals (tree.walk builds on this module, so
# the printing keeps its own count rather than importing it).


class _Totals:
    """Elements and bytes per collection, each variable once, its stacked copies included."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.is_tree = True

    def add(self, var: Variable, lifts: tuple[Lifted, ...]) -> None:
        copies = 1
        for lifted in lifts:
            size = lifted.copies(var.collection)
            copies *= 1 if size is None else size
        entry = self.counts.setdefault(var.collection, [0, 0])
        size = int(np.prod(var.shape, dtype=np.int64)) * copies
        entry[0] += size
        entry[1] += size * var.dtype.itemsize

    def line(self) -> str:
        if not self.is_tree:  # the lines above show where the cycle is
            return "No total: the modules do not form a tree."
        if not self.counts:
            return "No variables."
        parts = [
            f"{n:,} {'parameters' if name == 'params' else name + ' values'} ({format_bytes(b)})"
            for name, (n, b) in self.counts.items()
        ]
        return "Total: " + ", ".join(parts)


def _repr_lines(
    module: Module,
    path: Path,
    seen: dict[int, Path],
    stack: set[int],
    lifts: tuple[Lifted, ...],
    totals: _Totals,
) -> list[str]:
    seen[id(module)] = path
    stack.add(id(module))
    if isinstance(module, Lifted) and module.isolates():
        lifts = (*lifts, module)
    header = f"{type(module).__name__}("
    extra = module.extra_repr()
    body: list[str] = []
    for rel, child in iter_children(module):
        child_path = (*path, *rel)
        name = f"({'/'.join(rel)}): " if rel else ""  # a lifted wrapper's template
        if id(child) in stack:
            totals.is_tree = False
            body.append(f"{name}<cycle back to {path_str(seen[id(child)])!r}>")
        elif id(child) in seen:
            body.append(f"{name}<tied to {path_str(seen[id(child)])!r}>")
        elif isinstance(child, Variable):
            seen[id(child)] = child_path
            totals.add(child, lifts)
            body.append(name + repr(child))
        else:
            sub = _repr_lines(child, child_path, seen, stack, lifts, totals)
            body.extend([name + sub[0], *sub[1:]])
    stack.discard(id(module))
    if not body:
        return [f"{header}{extra})"]
    inner = ([extra] if extra else []) + body
    return [header, *("  " + line for line in inner), ")"]


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``"512 B"``, ``"1.5 KiB"``, ... ``"3.2 GiB"``."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
