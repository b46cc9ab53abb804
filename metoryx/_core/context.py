"""The execution frame: the arrays bound to a snapshot during one ``apply_fn`` call.

A snapshot module keeps no arrays. Its variable attributes are replaced, at transform time, by
*templates*: a :class:`Slot` (an index into the frame's value list) or a list/tuple/dict holding
slots. During a call, reading such an attribute looks the current frame up in a context
variable and returns the array in that slot; assigning a mutable State writes the slot.

Frames live in a :class:`contextvars.ContextVar` mapping each snapshot's owner token to its
frame, so concurrent calls in threads never see each other's arrays, and a transformed model can
be applied inside another model's method (each snapshot finds its own frame).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, cast

import jax

from metoryx import errors
from metoryx._core.paths import Path, path_str
from metoryx._core.typed import (
    get_opaque_trace_state,
    jnp_asarray,
    np_shape,
    register_pytree_node,
    register_pytree_with_keys,
)
from metoryx._core.variables import Variable


def trace_state() -> Any:
    """An object equal to another only when taken under the same JAX trace."""
    return get_opaque_trace_state(convention="metoryx")


class Slot(NamedTuple):
    """Where a variable's array sits in a frame's value list."""

    # Shadows tuple.index, which nothing calls on a Slot; the name reads best at every use.
    index: int  # pyright: ignore[reportIncompatibleMethodOverride]


class StackAxis(NamedTuple):
    """A leading axis of a stacked variable: one per copy made by a lifted wrapper.

    ``owner`` is the wrapper's module path; ``at`` is where the copy index goes into the
    variable's path to give the path of that copy in the unrolled layout (``blocks/3/kernel``
    for copy 3 of ``blocks/kernel``), which is the path its init key is derived from.
    """

    owner: Path
    at: int
    size: int


class BoundVariable(NamedTuple):
    """A snapshot variable with the path it is stored under and its stacked axes, if any."""

    path: Path
    variable: Variable
    axes: tuple[StackAxis, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the stored array: one leading axis per copy axis, then the variable's."""
        return (*(a.size for a in self.axes), *self.variable.shape)

    def copy_paths(self) -> list[Path]:
        """The unrolled path of every copy, in row-major order of the stacked axes.

        An unstacked variable has one copy at its own path. Copy ``(i, j)`` of a variable with
        two axes has ``str(i)`` and ``str(j)`` inserted where its axes say
        (``params/blocks/3/attn/kernel``): the path it has in the unrolled model.
        """
        paths = [self.path]
        for axis in self.axes:
            paths = [
                (*p[: axis.at], str(i), *p[axis.at :]) for p in paths for i in range(axis.size)
            ]
        return paths


class Frame:
    """The arrays and random streams of one ``apply_fn`` call, or of one trace of a lifted body.

    A lifted transformation (``mx.scan``, ``mx.vmap``, ``mx.checkpoint``, ...) runs its body in
    a *child* frame (see ``lifting.py``): a copy of the parent's values with the body's own
    arrays in their slots, its ``region`` (the parent, which slots may change, how rngs split)
    and the trace state of the body. ``trace`` is the JAX trace the frame belongs to: a State
    assigned or a key drawn under another trace (a raw ``jax.vmap`` or ``lax.scan`` inside
    module code) would leak a tracer, so it is refused.
    """

    __slots__ = (
        "variables",
        "values",
        "shapes",
        "streams",
        "counters",
        "derived",
        "trace",
        "region",
        "index",
        "written",
        "capture",
        "captured",
    )

    def __init__(
        self,
        variables: list[BoundVariable],
        values: list[Any],
        shapes: list[tuple[int, ...]],
        streams: dict[str, Any],
        capture: Any = None,
    ):
        self.variables = variables
        self.values = values
        self.shapes = shapes  # the shape of each slot's array in this frame
        self.streams = streams
        self.counters: dict[str, int] = {}
        self.derived: dict[str, Any] = {}
        self.trace = trace_state()
        self.region: Any = None  # the lifting.Region of a child frame
        self.index: Any = None  # the copy index of a child frame whose rngs are split
        self.written: dict[int, None] = {}  # slots assigned in this frame, in order
        self.capture = capture  # what mx.capture records, or None
        self.captured: dict[str, list[Any]] = {}

    def check_trace(self, what: str | Callable[[], str]) -> None:
        """Refuse ``what`` when JAX is tracing a transformation started inside module code.

        ``what`` may be a function, called only to write the error message.
        """
        if trace_state() != self.trace:
            what = what if isinstance(what, str) else what()
            raise errors.TransformBoundaryError(
                f"{what} inside a JAX transformation (jax.vmap, jax.lax.scan, jax.lax.cond, "
                f"jax.checkpoint, ...) that started inside the model's code. The value would "
                f"belong to that transformation and leak out of it as a tracer, or be the same "
                f"in every iteration. Use the lifted version, which carries State, random "
                f"keys and sown values across the boundary: mx.vmap, mx.scan or mx.Repeat, "
                f"mx.cond or mx.switch, mx.checkpoint."
            )

    def read(self, template: Any, where: str) -> Any:
        """The value of a templated attribute: arrays in place of the slots.

        Lists and dicts come back read-only (``where`` names them in the error): they are
        built for this read, so an item assignment would be silently lost.
        """
        if type(template) is Slot:
            return self.values[template.index]
        if isinstance(template, list):
            listed = cast("list[Any]", template)
            return ReadOnlyList([self.read(t, where) for t in listed], where)
        if isinstance(template, tuple):
            fields = cast("tuple[Any, ...]", template)
            items = [self.read(t, where) for t in fields]
            return type(fields)(*items) if hasattr(fields, "_fields") else tuple(items)
        if isinstance(template, dict):
            entries = cast("dict[Any, Any]", template)
            return ReadOnlyDict({k: self.read(t, where) for k, t in entries.items()}, where)
        return template

    def write(self, where: str, template: Any, value: Any) -> None:
        """Assign ``value`` to a templated attribute; only mutable State may change."""
        if type(template) is Slot:
            self._write_slot(where, template.index, value)
        elif isinstance(template, (list, tuple, dict)):
            self._write_container(where, template, value)
        elif value is not template:
            raise errors.ImmutableModuleError(
                f"{where}: this part of the container is configuration, which is frozen inside "
                f"apply_fn; only mutable mx.State entries can be assigned."
            )

    def _write_container(self, where: str, template: Any, value: Any) -> None:
        # isinstance narrows an Any to a container of Unknown items, `value` in the messages
        # too: the casts say Any, or object where only the type's name is read.
        if isinstance(template, dict):
            entries = cast("dict[Any, Any]", template)
            if not isinstance(value, dict) or value.keys() != entries.keys():
                raise errors.ImmutableModuleError(
                    f"{where}: expected a dict with keys {sorted(map(str, entries))} (the same "
                    f"structure as defined), got {type(cast(object, value)).__name__}. Assign "
                    f"a container with the same structure, changing only the mutable mx.State "
                    f"entries."
                )
            for key, t in entries.items():
                self._write_entry(f"{where}[{key!r}]", t, value[key])
            return
        items = cast("list[Any] | tuple[Any, ...]", template)
        given = cast("Sequence[Any]", value) if isinstance(value, (list, tuple)) else None
        if given is None or len(given) != len(items):
            raise errors.ImmutableModuleError(
                f"{where}: expected a {type(items).__name__} of length {len(items)} (the same "
                f"structure as defined), got {type(cast(object, value)).__name__}. Assign a "
                f"container with the same structure, changing only the mutable mx.State entries."
            )
        for i, (t, v) in enumerate(zip(items, given, strict=True)):
            self._write_entry(f"{where}[{i}]", t, v)

    def _write_entry(self, where: str, template: Any, value: Any) -> None:
        """One entry of an assigned container: an entry passed back unchanged is no write."""
        if type(template) is Slot and value is self.values[template.index]:
            return
        self.write(where, template, value)

    def _write_slot(self, where: str, index: int, value: Any) -> None:
        bound = self.variables[index]
        var = bound.variable
        if not var.mutable:
            kind = "a Parameter" if var.collection == "params" else "a read-only State"
            raise errors.ImmutableModuleError(
                f"{where} is {kind} ({path_str(bound.path)}), which cannot be assigned inside "
                f"apply_fn. Parameters change only through the `variables` you pass in (e.g. "
                f"after an optimizer step); for a value the model updates itself, declare it "
                f"as mx.State(collection, init, shape) with mutable=True."
            )
        expected = self.shapes[index]
        shape = tuple(np_shape(value))
        if shape != expected:
            raise errors.VariableShapeError(
                f"{where} ({path_str(bound.path)}): a State keeps its shape; expected a value of "
                f"shape {expected}, got {shape}. Reduce or reshape the new value to {expected}."
            )
        self.check_trace(f"{where} ({path_str(bound.path)}) is assigned")
        if self.region is not None:
            self.region.check_writable(where, index)
        self.values[index] = jnp_asarray(value, dtype=jax.dtypes.canonicalize_dtype(var.dtype))
        self.written[index] = None


def _refuse(self: ReadOnlyList | ReadOnlyDict, *args: Any, **kwargs: Any) -> None:
    raise errors.ImmutableModuleError(
        f"{self.where} holds variables and is read-only inside apply_fn: it is rebuilt on "
        f"every read, so changing an item would be silently lost. To update its mutable "
        f"mx.State entries, assign the whole container: `self.name = [...]` or `{{...}}` with "
        f"the same structure."
    )


class ReadOnlyList(list[Any]):
    """A list of variables' arrays read inside apply_fn: JAX flattens it like a list, and
    ``jax.tree.map`` over it returns a plain list."""

    def __init__(self, items: list[Any], where: str):
        super().__init__(items)
        self.where = where

    # Every mutating method refuses; their signatures differ from list's on purpose.
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse  # pyright: ignore[reportAssignmentType]
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse  # pyright: ignore[reportAssignmentType]


class ReadOnlyDict(dict[Any, Any]):
    """A dict of variables' arrays read inside apply_fn: JAX flattens it like a dict (in
    insertion order), and ``jax.tree.map`` over it returns a plain dict."""

    def __init__(self, items: dict[Any, Any], where: str):
        super().__init__(items)
        self.where = where

    # Every mutating method refuses; their signatures differ from dict's on purpose.
    __setitem__ = __delitem__ = __ior__ = _refuse  # pyright: ignore[reportAssignmentType]
    pop = popitem = clear = setdefault = update = _refuse  # pyright: ignore[reportAssignmentType]


def _flatten_list(xs: ReadOnlyList) -> tuple[list[Any], None]:
    return list(xs), None


def _unflatten_list(_: None, children: Iterable[Any]) -> list[Any]:
    return list(children)


def _flatten_dict_with_keys(d: ReadOnlyDict) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    return [(jax.tree_util.DictKey(k), v) for k, v in d.items()], tuple(d)


def _flatten_dict(d: ReadOnlyDict) -> tuple[list[Any], tuple[Any, ...]]:
    return list(d.values()), tuple(d)


def _unflatten_dict(keys: tuple[Any, ...], children: Iterable[Any]) -> dict[Any, Any]:
    return dict(zip(keys, children, strict=True))


# Flattened like the builtins, unflattened *as* the builtins: jax.tree.map returns plain ones.
register_pytree_node(ReadOnlyList, _flatten_list, _unflatten_list)
register_pytree_with_keys(ReadOnlyDict, _flatten_dict_with_keys, _unflatten_dict, _flatten_dict)


# owner token -> Frame, innermost call last. A fresh dict per entry: never mutated in place.
FRAMES: contextvars.ContextVar[Mapping[object, Frame]] = contextvars.ContextVar(
    "metoryx_frames", default=MappingProxyType({})
)


@contextlib.contextmanager
def entered(owner: object, frame: Frame) -> Generator[Frame]:
    """Make ``frame`` the current frame of the snapshot ``owner`` while the block runs."""
    frames = dict(FRAMES.get())
    frames.pop(owner, None)  # re-inserted last: the innermost
    frames[owner] = frame
    token = FRAMES.set(frames)
    try:
        yield frame
    finally:
        FRAMES.reset(token)


def innermost_frame() -> tuple[object, Frame] | None:
    """The owner and frame of the innermost running ``apply_fn``, or ``None``."""
    frames = FRAMES.get()
    if not frames:
        return None
    owner = next(reversed(frames))
    return owner, frames[owner]
