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

import contextvars
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metoryx import errors
from metoryx._core.paths import Path, path_str
from metoryx._core.variables import Variable


class Slot(NamedTuple):
    """Where a variable's array sits in a frame's value list."""

    index: int


class BoundVariable(NamedTuple):
    """A snapshot variable with the path it is stored under."""

    path: Path
    variable: Variable


class Frame:
    """The arrays and random streams of one ``apply_fn`` call."""

    __slots__ = ("variables", "values", "streams", "counters", "derived")

    def __init__(self, variables: list[BoundVariable], values: list[Any], streams: dict[str, Any]):
        self.variables = variables
        self.values = values
        self.streams = streams
        self.counters: dict[str, int] = {}
        self.derived: dict[str, Any] = {}

    def read(self, template: Any) -> Any:
        """The value of a templated attribute: arrays in place of the slots."""
        if type(template) is Slot:
            return self.values[template.index]
        if isinstance(template, list):
            return [self.read(t) for t in template]
        if isinstance(template, tuple):
            items = [self.read(t) for t in template]
            return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
        if isinstance(template, dict):
            return {k: self.read(t) for k, t in template.items()}
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
        if isinstance(template, dict):
            if not isinstance(value, dict) or value.keys() != template.keys():
                raise errors.ImmutableModuleError(
                    f"{where}: expected a dict with keys {sorted(map(str, template))} (the same "
                    f"structure as defined), got {type(value).__name__}. Assign a container "
                    f"with the same structure, changing only the mutable mx.State entries."
                )
            for key, t in template.items():
                self.write(f"{where}[{key!r}]", t, value[key])
            return
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            raise errors.ImmutableModuleError(
                f"{where}: expected a {type(template).__name__} of length {len(template)} (the "
                f"same structure as defined), got {type(value).__name__}. Assign a container "
                f"with the same structure, changing only the mutable mx.State entries."
            )
        for i, (t, v) in enumerate(zip(template, value, strict=True)):
            self.write(f"{where}[{i}]", t, v)

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
        shape = tuple(jnp.shape(value))
        if shape != var.shape:
            raise errors.VariableShapeError(
                f"{where} ({path_str(bound.path)}): a State keeps its shape; expected a value of "
                f"shape {var.shape}, got {shape}. Reduce or reshape the new value to {var.shape}."
            )
        self.values[index] = jnp.asarray(value, dtype=jax.dtypes.canonicalize_dtype(var.dtype))


# owner token -> Frame, innermost call last. A fresh dict per entry: never mutated in place.
FRAMES: contextvars.ContextVar[dict[object, Frame]] = contextvars.ContextVar(
    "metoryx_frames", default={}
)


def innermost_frame() -> tuple[object, Frame] | None:
    """The owner and frame of the innermost running ``apply_fn``, or ``None``."""
    frames = FRAMES.get()
    if not frames:
        return None
    owner = next(reversed(frames))
    return owner, frames[owner]
