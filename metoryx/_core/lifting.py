"""Lifting: running part of a model's code under a JAX transformation, State and rngs included.

Module code reads its variables from the running :class:`~metoryx._core.context.Frame`. A JAX
transformation (``lax.scan``, ``jax.vmap``, ``jax.checkpoint``, ``lax.cond``) traces its body
with new tracers, so a body that assigns a State or draws a key must do so in a frame of its
own: a *child* frame, made by a :class:`Region` each time the body is traced. The child starts
as a copy of the parent's values, with the body's own arrays (one layer's slice of stacked
variables, the carried State) in their slots. The body returns what changed in it (the written
slots and the sown values) as outputs of the transformation, and :meth:`Region.finish` writes
the transformation's results back into the parent, where they are plain values of the
parent's trace again.

Random keys: a stream that the region does not split continues the parent's counter, so the
keys inside are exactly those the code would draw unlifted (``mx.checkpoint`` and ``mx.cond``
change nothing). A split stream gives copy ``i`` the key the parent would draw next, folded
with ``i``: different per layer of ``mx.Repeat`` or member of ``mx.vmap``, the same on every
run. Either way the parent's counters move past every key the body used.

All of this runs at trace time: the compiled program holds the transformation and the model's
own operations only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Generator, Mapping
from typing import Any, NamedTuple, cast

from metoryx import errors
from metoryx._core.context import Frame, entered
from metoryx._core.module import BINDING, Lifted, Module, module_label, running_frame
from metoryx._core.paths import Path, path_str
from metoryx._core.typed import np_shape

ALL = "all"  # variable_axes meaning: every collection is stacked


def stacked_copies(variable_axes: Any, size: int | None, collection: str) -> int | None:
    """``copies`` for a wrapper configured with ``variable_axes`` and ``size`` copies."""
    if variable_axes == ALL or (isinstance(variable_axes, Mapping) and collection in variable_axes):
        return size
    return None


def check_variable_axes(where: str, variable_axes: Any, size: int | None) -> dict[str, int]:
    """Validate ``variable_axes`` (``{collection: 0}``, or ``None`` for all shared)."""
    if variable_axes is None:
        return {}
    # isinstance alone would give the mapping Unknown keys and values: the cast says Any.
    axes = cast("Mapping[Any, Any]", variable_axes) if isinstance(variable_axes, Mapping) else None
    if axes is None or not all(isinstance(k, str) for k in axes):
        raise errors.LayerConfigError(
            f"{where}: variable_axes must map collection names to 0 (one copy per step or "
            f"member, stacked on a leading axis), e.g. {{'params': 0}}; got {variable_axes!r}."
        )
    mapped = {k: v for k, v in axes.items() if v is not None}
    bad = {k: v for k, v in mapped.items() if v != 0}
    if bad:
        raise errors.LayerConfigError(
            f"{where}: variables are stacked on their leading axis; variable_axes values must "
            f"be 0 (stacked) or None (shared), got {bad}. Move the axis inside the module "
            f"(e.g. jnp.moveaxis) if you need it elsewhere."
        )
    if mapped and size is None:
        raise errors.LayerConfigError(
            f"{where}: variable_axes={variable_axes} keeps a copy of those variables per step "
            f"or member, so the number of copies must be known when the model is defined. "
            f"Pass it: length=... for mx.scan, axis_size=... for mx.vmap."
        )
    return mapped


def check_split_rngs(where: str, split_rngs: Any) -> bool | frozenset[str]:
    """``True`` (split every stream), ``False`` (share all) or the names of the split streams."""
    if isinstance(split_rngs, bool):
        return split_rngs
    if isinstance(split_rngs, str):
        return frozenset([split_rngs])
    names = cast("Collection[Any]", split_rngs) if isinstance(split_rngs, Collection) else None
    if names is not None and all(isinstance(s, str) for s in names):
        return frozenset(names)
    raise errors.LayerConfigError(
        f"{where}: split_rngs must be True (every stream differs per step or member), False "
        f"(all are shared) or stream names such as ('dropout',); got {split_rngs!r}."
    )


class Plan(NamedTuple):
    """The slots a lifted wrapper's module owns, found once per snapshot."""

    owned: frozenset[int]
    stacked: tuple[int, ...]  # slots with a copy axis of this wrapper (its leading axis now)
    carried: tuple[int, ...]  # mutable slots shared by every step or member


def running(module: Module, transform: str) -> tuple[object, Frame]:
    """The snapshot owner and the current frame of a bound module inside ``apply_fn``."""
    found = running_frame(module)
    if found is None:
        raise errors.ApplyContextError(
            f"{transform} ({module_label(module)}) was called outside apply_fn. It runs inside "
            f"a transformed model: mx.transform(model), then apply_fn(variables, rngs, ...)."
        )
    return found[0].owner, found[1]


def plan_of(wrapper: Lifted) -> Plan:
    """The slots of the variables that ``wrapper``'s module holds (cached by the snapshot)."""
    binding = wrapper.__dict__[BINDING]
    owner, path = binding.owner, binding.path
    cache: dict[Path, Plan] = owner.lift_plans
    plan = cache.get(path)
    if plan is None:
        owned: list[int] = []
        stacked: list[int] = []
        carried: list[int] = []
        for slot, bound in enumerate(owner.variables):
            if bound.path[1 : 1 + len(path)] != path:
                continue
            owned.append(slot)
            if any(axis.owner == path for axis in bound.axes):
                stacked.append(slot)
            elif bound.variable.mutable:
                carried.append(slot)
        plan = cache[path] = Plan(frozenset(owned), tuple(stacked), tuple(carried))
    return plan


class Region:
    """One call of a lifted transformation: its parent frame and the rules of its body."""

    def __init__(
        self,
        owner: object,
        parent: Frame,
        transform: str,
        writable: frozenset[int] | None = None,
        split: bool | frozenset[str] = False,
        runs: int = 1,
        looped: bool = False,
    ):
        self.owner = owner
        self.parent = parent
        self.transform = transform
        self.writable = writable  # None: any slot may be assigned
        self.split = split
        # How many times one call runs the body (scan steps, vmap members), and whether in
        # sequence: XLA's cost analysis counts a loop's body once, a vmap's members all
        # (mx.summary scales the costs it reads by these).
        self.runs = runs
        self.looped = looped
        self.start = dict(parent.counters)
        self.split_used: set[str] = set()
        self.end: dict[str, int] = {}  # the counters of unsplit streams after the body
        self.written: dict[int, None] = {}  # the slots any trace of the body assigned

    def splits(self, stream: str) -> bool:
        """Whether ``stream`` gets a different key per copy in this region."""
        return self.split is True or (self.split is not False and stream in self.split)

    def check_writable(self, where: str, slot: int) -> None:
        """Refuse an assignment, in the body, of a State the lifted module does not hold."""
        if self.writable is not None and slot not in self.writable:
            raise errors.TransformBoundaryError(
                f"{where} ({path_str(self.parent.variables[slot].path)}) is assigned inside "
                f"{self.transform}, but it belongs to a module outside the one that "
                f"{self.transform} runs, whose State it cannot carry out. Update it outside, "
                f"from a value the lifted module returns, or move the State inside."
            )

    @contextlib.contextmanager
    def body(self, values: Mapping[int, Any] | None = None, index: Any = None) -> Generator[Frame]:
        """A child frame for one trace of the body, current while the block runs.

        ``values`` are the body's own arrays by slot (a layer's slice, the carried State);
        ``index`` is the copy index that split streams fold in.
        """
        parent = self.parent
        child = Frame(
            parent.variables, list(parent.values), list(parent.shapes), {}, parent.capture
        )
        for slot, value in (values or {}).items():
            child.values[slot] = value
            child.shapes[slot] = tuple(np_shape(value))
        child.region = self
        child.index = index
        child.counters = {s: c for s, c in self.start.items() if not self.splits(s)}
        with entered(self.owner, child):
            yield child
        self.written.update(child.written)
        for stream, count in child.counters.items():
            if not self.splits(stream):
                self.end[stream] = max(count, self.end.get(stream, 0))

    def finish(self, written: Mapping[int, Any], captured: Mapping[str, list[Any]]) -> None:
        """After the transformation: its results into the parent, counters past the body's."""
        parent = self.parent
        for slot, value in written.items():
            if parent.region is not None:
                parent.region.check_writable(self.transform, slot)
            parent.values[slot] = value
            parent.written[slot] = None
        for key, values in captured.items():
            parent.captured.setdefault(key, []).extend(values)
        parent.counters.update(self.end)
        for stream in self.split_used:
            parent.counters[stream] = self.start.get(stream, 0) + 1
