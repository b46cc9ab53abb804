"""``mx.summary``: a model call by call (shapes, variables, FLOPs, bytes), from shapes alone.

How it works. The model runs once, under ``jax.jit(...).lower``, on abstract variables
(``jax.eval_shape(init_fn, key)``) and abstract inputs, with a capture whose ``calls`` sees
every call of a module (``intermediates.hook_calls``): its abstract inputs, output and frame.
Each recorded call is then lowered on its own, on what it saw, and XLA's cost analysis of the
lowered program (``Lowered.cost_analysis()``: no compile, no allocation) gives its FLOPs and
bytes accessed. Nothing is ever allocated but shapes, so a model larger than memory is
summarised on a laptop. A call's program takes only its module's variables as inputs (one
that reads a weight tied elsewhere is traced again with them all), and each distinct program
is lowered and analysed once: the alike blocks of an unrolled model cost one lowering.

Loops. XLA's analysis counts the body of a loop (``lax.scan``, so ``mx.Repeat`` and
``mx.scan``) once, and the members of a ``jax.vmap`` all (batched operations). A call inside a
lifted transformation is recorded once, since its body is traced once, with ``runs``: how many
times it runs per call of the model. The costs of every call that holds a loop are scaled up
accordingly, so the FLOPs of an ``mx.Repeat(block, 48)`` row are 48 blocks' (plus the loop's
own bookkeeping) and the totals are those of the whole computation, as if unrolled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from metoryx import errors
from metoryx._core.arguments import bool_argument
from metoryx._core.context import BoundVariable, Frame, entered
from metoryx._core.module import BINDING, Lifted, Module, format_bytes, running_frame
from metoryx._core.paths import Path
from metoryx._core.rng import parse_rngs
from metoryx._core.transform import Snapshot, Transformed
from metoryx.intermediates import Capture, hook_calls

if TYPE_CHECKING:
    from rich.table import Table

_NOTE = "mx.summary:"  # starts the note added to an error raised by a module's call


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One call of a module's ``__call__``, as :func:`summary` saw it.

    Attributes:
        path: the module's path, parts joined with ``"/"`` (``"blocks/attn"``); ``""`` for the
            root. The layer inside ``mx.Repeat``/``mx.vmap`` has its wrapper's path.
        module: the module's class name.
        depth: how many module calls enclose this one (0 for the root's call).
        runs: how many times the call runs per call of the model: 1, or the number of layers,
            steps or members of the ``mx.Repeat``, ``mx.scan`` and ``mx.vmap`` around it (its
            body is traced once, so it is one row).
        inputs: the positional arguments, arrays as ``jax.ShapeDtypeStruct``.
        keywords: the keyword arguments, arrays as ``jax.ShapeDtypeStruct``.
        output: the output, arrays as ``jax.ShapeDtypeStruct``.
        variables: the number of elements per collection (``{"params": 1234}``) of the
            variables stored under the module's path, its sub-modules' included, each tied
            variable once (with the module whose path stores it). A layer inside
            ``mx.Repeat`` counts one copy, the ``Repeat`` row all of them.
        variable_bytes: the bytes of those variables per collection.
        flops: the floating-point operations of one run of the call, from XLA's cost
            analysis (a multiply-add counts 2), loops inside counted as often as they run;
            ``nan`` where XLA gives no analysis or the call cannot be lowered on its own.
        bytes_accessed: the bytes that call reads and writes, from the same analysis (an
            upper bound: it is counted before XLA fuses operations).

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> row = mx.summary(mx.Dense(3, 2), jnp.ones((4, 3)), show=False).rows[0]
        >>> row.module, row.output.shape, row.variables, row.flops
        ('Dense', (4, 2), {'params': 8}, 56.0)
    """

    path: str
    module: str
    depth: int
    runs: int
    inputs: tuple[Any, ...]
    keywords: dict[str, Any]
    output: Any
    variables: dict[str, int]
    variable_bytes: dict[str, int]
    flops: float
    bytes_accessed: float


@dataclasses.dataclass(frozen=True)
class Summary:
    """What :func:`summary` returns: the rows and the totals of the whole model.

    ``str(summary)`` is the plain-text table; with ``rich`` installed, ``rich.print(summary)``
    prints it as a ``rich`` table.

    Attributes:
        rows: one :class:`SummaryRow` per module call, in call order (a module before the
            modules it calls).
        variables: the number of elements per collection of all the model's variables.
        variable_bytes: their bytes per collection.
        flops: the FLOPs of one call of the model, loops counted as often as they run.
        bytes_accessed: the bytes that call reads and writes, as XLA counts them.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(3, 8), mx.relu, mx.Dense(8, 2))
        >>> result = mx.summary(model, jnp.ones((4, 3)), show=False)
        >>> [row.path for row in result.rows], result.variables
        (['', 'layers/0', 'layers/2'], {'params': 50})
    """

    rows: tuple[SummaryRow, ...]
    variables: dict[str, int]
    variable_bytes: dict[str, int]
    flops: float
    bytes_accessed: float

    def __str__(self) -> str:
        header, lines, total = self._cells()
        widths = [
            max(len(cells[i]) for cells in (header, *lines, total)) for i in range(len(header))
        ]
        left = 4  # path, module, inputs, outputs: text; the rest: numbers

        def line(cells: list[str]) -> str:
            padded = [
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(padded).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *map(line, lines), rule, line(total)])

    def __rich__(self) -> Table:
        """The table as a ``rich.table.Table`` (``rich`` must be installed)."""
        from rich.table import Table

        header, lines, total = self._cells()
        table = Table(title=f"mx.summary: {len(self.rows)} module calls")
        for i, name in enumerate(header):
            justify = "left" if i < 4 else "right"
            table.add_column(name, justify=justify, overflow="fold", no_wrap=i < 2)
        for cells in lines:
            table.add_row(*cells)
        table.add_section()
        table.add_row(*total, style="bold")
        return table

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        collections = list(self.variables)
        header = ["path", "module", "inputs", "outputs", *collections, "FLOPs", "bytes accessed"]
        lines = [
            [
                row.path or "(root)",
                "  " * row.depth + row.module + (f" ×{row.runs}" if row.runs > 1 else ""),
                _shapes((row.inputs, row.keywords)),
                _shapes(row.output),
                *(_size(row.variables, row.variable_bytes, c) for c in collections),
                _count(row.flops),
                _byte_count(row.bytes_accessed),
            ]
            for row in self.rows
        ]
        total = [
            "Total",
            "",
            "",
            "",
            *(_size(self.variables, self.variable_bytes, c) for c in collections),
            _count(self.flops),
            _byte_count(self.bytes_accessed),
        ]
        return header, lines, total


def summary(
    model: Module | Transformed,
    /,
    *args: Any,
    rngs: Any = None,
    show: bool = True,
    **kwargs: Any,
) -> Summary:
    """Print a table of ``model``'s module calls on ``args``; return it as data.

    One row per call of a module's ``__call__``: its path, class, input and output shapes and
    dtypes, the variables stored under its path (elements and bytes per collection, its
    sub-modules' included), and the FLOPs and bytes accessed of the call from XLA's cost
    analysis of that call alone (lowered, never compiled). The totals at the bottom are the
    whole model's. Everything is computed from shapes (``jax.eval_shape`` of ``init_fn``,
    abstract inputs): no weight is allocated and nothing runs, so a model larger than memory
    is summarised too.

    A module called several times gives one row per call. A layer inside ``mx.Repeat``,
    ``mx.scan`` or ``mx.vmap`` is traced once, so it is one row, marked ``×n`` (its ``runs``),
    with the FLOPs of one run; the rows around it, and the totals, count it ``n`` times.
    Methods other than ``__call__`` and plain functions (``mx.relu``) are no rows; their cost
    is in the row of the module that calls them.

    With ``rich`` installed (``pip install metoryx[summary]``) the table is a ``rich`` table,
    otherwise plain text with aligned columns.

    Args:
        model: an ``mx.Module`` (transformed here), or the result of ``mx.transform(model)``
            (for another method than ``__call__``: ``mx.transform(model, method=...)``).
        *args: the example inputs of the call: arrays or ``jax.ShapeDtypeStruct`` (only
            their shapes and dtypes are used), and any other Python values.
        rngs: the random keys, as ``apply_fn`` takes them, for layers that draw some (dropout
            when training); ``None`` gives a fixed key. Only their shape matters.
        show: print the table (``False``: only return it).
        **kwargs: keyword arguments of the call, e.g. ``is_training=True``.

    Returns:
        A :class:`Summary`: ``.rows`` (one :class:`SummaryRow` per call) and the totals.

    Raises:
        ModuleStructureError: when ``model`` is neither a module nor a transformed model.
        Exception: what the model's call raises on these inputs, with a note naming the
            path and inputs of the innermost module call that raised it.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(3, 8), mx.relu, mx.Dense(8, 2))
        >>> x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
        >>> print(mx.summary(model, x, show=False))
        path      module      inputs        outputs           params  FLOPs  bytes accessed
        --------  ----------  ------------  ------------  ----------  -----  --------------
        (root)    Sequential  float32[4,3]  float32[4,2]  50 (200 B)    392         1.9 KiB
        layers/0    Dense     float32[4,3]  float32[4,8]  32 (128 B)    224          1008 B
        layers/2    Dense     float32[4,8]  float32[4,2]   18 (72 B)    136           408 B
        --------  ----------  ------------  ------------  ----------  -----  --------------
        Total                                             50 (200 B)    392         1.9 KiB
    """
    show = bool_argument("mx.summary", "show", show)
    snapshot = _snapshot(model)
    rngs = jax.random.key(0) if rngs is None else rngs
    for _, module in snapshot.modules:
        if _has_call(module):  # a module without one is no row
            hook_calls(module)
    # The shapes init_fn gives (jax.eval_shape of it would trace the initializers for them).
    values = [
        jax.ShapeDtypeStruct(b.shape, jax.dtypes.canonicalize_dtype(b.variable.dtype))
        for b in snapshot.variables
    ]
    recorder = _Recorder()
    inputs = _Inputs(_abstract((args, kwargs)))
    request = Capture((), frozenset(), recorder)
    flops, nbytes = _lowered_costs(snapshot, _entry(snapshot), values, rngs, inputs, request)
    owned = _owned_variables(snapshot)
    slot_of = {id(bound): slot for slot, bound in enumerate(snapshot.variables)}
    costs: dict[str, tuple[float, float]] = {}
    for call in recorder.calls:
        reads = [slot_of[id(bound)] for bound in owned.get(call.path, [])]
        call.xla = _lowered_costs(
            snapshot, call.module, call.values, rngs, call.inputs, None, reads, costs
        )
    for call in recorder.top:
        _expand(call)
    flops, nbytes = _expanded(flops, nbytes, recorder.top)
    counts, sizes = _count_variables(snapshot.variables, frozenset())
    result = Summary(
        tuple(_row(call, owned) for call in recorder.calls), counts, sizes, flops, nbytes
    )
    if show:
        _print(result)
    return result


def _snapshot(model: Any) -> Snapshot:
    if isinstance(model, Module):
        return Snapshot(model, None)
    snapshot = getattr(getattr(model, "init", None), "__self__", None)
    if isinstance(model, tuple) and isinstance(snapshot, Snapshot):
        return snapshot
    raise errors.ModuleStructureError(
        f"mx.summary expects an mx.Module (e.g. mx.Dense(2, 3)) or what mx.transform(model) "
        f"returns, got {type(model).__name__}. Pass the model itself: mx.summary(model, x)."
    )


def _has_call(module: Module) -> bool:
    return callable(module)  # a function, not inline: callable() would narrow Module away


def _entry(snapshot: Snapshot) -> Callable[..., Any]:
    """What ``apply_fn`` runs, through the hooked ``__call__`` when that is what it runs."""
    fn = snapshot.fn
    if fn is None:
        raise errors.MethodError(
            f"{type(snapshot.root).__name__} defines no __call__, so mx.summary has nothing to "
            f"run. Pass the method to run: mx.summary(mx.transform(model, method='encode'), x)."
        )
    is_call = getattr(fn, "__self__", None) is snapshot.root and fn.__name__ == "__call__"
    return snapshot.root if is_call else fn  # the bound __call__ predates the hook


def _print(result: Summary) -> None:
    try:
        from rich.console import Console
    except ImportError:
        print(result)
        return
    console = Console()
    table = result.__rich__()
    # Wider than the console, rich would fold every cell into a column of characters; a line
    # the terminal wraps is easier to read, so the table keeps its natural width.
    width = console.measure(table, options=console.options.update_width(1 << 16)).maximum
    (console if width <= console.width else Console(width=width)).print(table)


# ---------------------------------------------------------------------------------------------
# Recording the calls.


class _Call:
    """One module call seen while the model was traced."""

    def __init__(self, module: Module, depth: int, enclosing: frozenset[Path]):
        self.module = module
        self.path: Path = module.__dict__[BINDING].path
        self.depth = depth
        self.enclosing = enclosing  # the paths of the lifted wrappers whose body this is in
        self.runs = 1
        self.trips = 1  # loop steps between the caller's frame and this call's
        self.members = 1  # vmap members between them
        self.values: list[jax.ShapeDtypeStruct] = []
        self.inputs = _Inputs(None)
        self.output: Any = None
        self.children: list[_Call] = []
        self.xla = (math.nan, math.nan)  # XLA's flops and bytes, each loop body once
        self.flops = math.nan  # those with every loop counted as often as it runs
        self.bytes = math.nan


class _Recorder:
    """The ``calls`` of a Capture: records each module call, in order, as a tree."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.top: list[_Call] = []  # the calls made by the model's method itself
        self.stack: list[tuple[_Call, Frame]] = []
        self.values: dict[int, tuple[Frame, list[jax.ShapeDtypeStruct]]] = {}

    def __call__(
        self, module: Module, method: Callable[..., Any], args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        frame = _frame_of(module)
        caller, caller_frame = self.stack[-1] if self.stack else (None, None)
        enclosing = frozenset(c.path for c, _ in self.stack if isinstance(c.module, Lifted))
        call = _Call(module, len(self.stack), enclosing)
        call.trips, call.members = _runs_between(frame, caller_frame)
        call.runs = (caller.runs if caller else 1) * call.trips * call.members
        call.values = self._values(frame)
        call.inputs = _Inputs(_abstract((args, dict(kwargs))))
        (caller.children if caller else self.top).append(call)
        self.calls.append(call)
        self.stack.append((call, frame))
        try:
            out = method(module, *args, **kwargs)
        except Exception as e:
            if not any(n.startswith(_NOTE) for n in getattr(e, "__notes__", ())):
                e.add_note(
                    f"{_NOTE} raised by the call of {type(module).__name__} at "
                    f"{'/'.join(call.path) or '(root)'!r} on inputs "
                    f"({_shapes(call.inputs.abstract) or 'no arrays'}). Check the example "
                    f"inputs passed to mx.summary against what that module expects."
                )
            raise
        finally:
            self.stack.pop()
        call.output = _abstract(out)
        return out

    def _values(self, frame: Frame) -> list[jax.ShapeDtypeStruct]:
        """The frame's arrays as shapes, once per frame (a loop body has a frame of its own)."""
        found = self.values.get(id(frame))
        if found is None:
            found = self.values[id(frame)] = (frame, [_struct(v) for v in frame.values])
        return found[1]


def _frame_of(module: Module) -> Frame:
    found = running_frame(module)
    assert found is not None  # a hooked call only reaches the recorder through its frame
    return found[1]


def _runs_between(frame: Frame, stop: Frame | None) -> tuple[int, int]:
    """Loop steps and vmap members between ``stop`` (the caller's frame) and ``frame``."""
    trips = members = 1
    while frame is not stop and frame.region is not None:
        region = frame.region
        if region.looped:
            trips *= region.runs
        else:
            members *= region.runs
        frame = region.parent
    return trips, members


class _Inputs:
    """Arguments as abstract leaves (the arrays) and the rest, to be filled with tracers."""

    def __init__(self, abstract: Any):
        self.abstract = abstract
        self.leaves, self.treedef = jax.tree.flatten(abstract)
        self.where = [i for i, x in enumerate(self.leaves) if isinstance(x, jax.ShapeDtypeStruct)]
        self.arrays = [self.leaves[i] for i in self.where]

    def filled(self, arrays: list[Any]) -> Any:
        leaves = list(self.leaves)
        for i, array in zip(self.where, arrays, strict=True):
            leaves[i] = array
        return jax.tree.unflatten(self.treedef, leaves)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    aval = getattr(x, "aval", x)  # a jax.Array's (tracers too); NumPy's and structs' are theirs
    weak = bool(getattr(aval, "weak_type", False))
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: _struct(x) if _is_array(x) else x, tree)


# ---------------------------------------------------------------------------------------------
# Costs.


class _Unread:
    """What a slot holds in a call lowered with only its own variables: any use of it fails
    (it is no array), and the call is lowered again with every variable."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"an unread slot has no {name!r}")


_UNREAD = _Unread()


def _lowered_costs(
    snapshot: Snapshot,
    fn: Callable[..., Any],
    values: list[jax.ShapeDtypeStruct],
    rngs: Any,
    inputs: _Inputs,
    capture: Capture | None = None,
    reads: list[int] | None = None,
    costs: dict[str, tuple[float, float]] | None = None,
) -> tuple[float, float]:
    """XLA's costs of ``fn`` (a module, or the model's method) on ``values`` and ``inputs``.

    ``values`` are the shapes of the frame's arrays, the model's or a loop body's; the
    program returns the output and the State written, as ``apply_fn`` does. ``reads``, when
    given, are the slots the call is expected to read (its module's own variables): only they
    become inputs of the lowered program, so that the lowering of one layer's call does not
    grow with the size of the whole model. A call that reads any other slot (a weight tied to
    a module elsewhere) finds an ``_Unread`` there, fails, and is lowered again with them all.
    ``costs`` caches the costs by program, across the calls of one summary.
    """
    costs = {} if costs is None else costs

    def run(given: list[Any], rngs: Any, arrays: list[Any]) -> Any:
        args, kwargs = inputs.filled(arrays)
        shapes = [tuple(v.shape) for v in values]
        if reads is None:
            slots = list(given)
        else:
            slots: list[Any] = [_UNREAD] * len(values)
            for i, value in zip(reads, given, strict=True):
                slots[i] = value
        frame = Frame(snapshot.variables, slots, shapes, parse_rngs(rngs), capture)
        with entered(snapshot, frame):
            out = fn(*args, **kwargs)
        return out, [frame.values[i] for i in frame.written]

    given = values if reads is None else [values[i] for i in reads]
    try:
        traced = jax.jit(run).trace(given, rngs, inputs.arrays)
    except NameError:
        if capture is not None:
            raise
        return math.nan, math.nan  # a collective over an axis named by a vmap around the call
    except Exception:
        if reads is None:
            raise
        return _lowered_costs(snapshot, fn, values, rngs, inputs, capture, None, costs)
    # The costs follow from the program alone: alike calls (the blocks of an unrolled model)
    # are lowered and analysed once.
    key = str(traced.jaxpr)
    found = costs.get(key)
    if found is None:
        analysis = traced.lower().cost_analysis() or {}
        found = costs[key] = (
            float(analysis.get("flops", math.nan)),
            float(analysis.get("bytes accessed", math.nan)),
        )
    return found


def _expand(call: _Call) -> None:
    """``call.flops``/``bytes``: XLA's, with each loop inside counted as often as it runs."""
    for child in call.children:
        _expand(child)
    call.flops, call.bytes = _expanded(*call.xla, call.children)


def _expanded(flops: float, nbytes: float, children: list[_Call]) -> tuple[float, float]:
    """Costs that count each loop body once, plus the runs that XLA left out.

    A child inside a loop of ``n`` steps is in XLA's count once, so ``n - 1`` more runs are
    added; a child inside a ``vmap`` of ``m`` members is in it ``m`` times already (batched),
    but the loops inside it once per member.
    """
    for child in children:
        xla_flops, xla_bytes = child.xla
        if not math.isnan(child.flops + xla_flops):
            flops += child.members * (child.trips * child.flops - xla_flops)
        if not math.isnan(child.bytes + xla_bytes):
            nbytes += child.members * (child.trips * child.bytes - xla_bytes)
    return flops, nbytes


# ---------------------------------------------------------------------------------------------
# Variables and rows.


def _owned_variables(snapshot: Snapshot) -> dict[Path, list[BoundVariable]]:
    """The variables stored under each module path (every prefix of a variable's path)."""
    owned: dict[Path, list[BoundVariable]] = {}
    for bound in snapshot.variables:
        inner = bound.path[1:-1]
        for k in range(len(inner) + 1):
            owned.setdefault(inner[:k], []).append(bound)
    return owned


def _count_variables(
    variables: list[BoundVariable], enclosing: frozenset[Path]
) -> tuple[dict[str, int], dict[str, int]]:
    """Elements and bytes per collection; copies made by ``enclosing`` wrappers count once."""
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for bound in variables:
        var = bound.variable
        copies = math.prod(a.size for a in bound.axes if a.owner not in enclosing)
        n = math.prod(var.shape) * copies
        itemsize = np.dtype(jax.dtypes.canonicalize_dtype(var.dtype)).itemsize
        counts[var.collection] = counts.get(var.collection, 0) + n
        sizes[var.collection] = sizes.get(var.collection, 0) + n * itemsize
    return counts, sizes


def _row(call: _Call, owned: dict[Path, list[BoundVariable]]) -> SummaryRow:
    args, kwargs = call.inputs.abstract
    counts, sizes = _count_variables(owned.get(call.path, []), call.enclosing)
    return SummaryRow(
        path="/".join(call.path),
        module=type(call.module).__name__,
        depth=call.depth,
        runs=call.runs,
        inputs=tuple(args),
        keywords=dict(kwargs),
        output=call.output,
        variables=counts,
        variable_bytes=sizes,
        flops=call.flops,
        bytes_accessed=call.bytes,
    )


# ---------------------------------------------------------------------------------------------
# Cells.


def _leaves(tree: Any) -> Iterator[jax.ShapeDtypeStruct]:
    return (x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def _shapes(tree: Any) -> str:
    return ", ".join(f"{x.dtype.name}[{','.join(map(str, x.shape))}]" for x in _leaves(tree))


def _size(counts: dict[str, int], sizes: dict[str, int], collection: str) -> str:
    n = counts.get(collection, 0)
    return f"{n:,} ({format_bytes(sizes[collection])})" if n else ""


def _count(x: float) -> str:
    if math.isnan(x):
        return "?"
    for unit in ("", "K", "M", "G", "T"):
        if abs(x) < 1000:
            return f"{x:.3g}{unit}" if unit else f"{x:.0f}"
        x /= 1000
    return f"{x:.3g}P"


def _byte_count(x: float) -> str:
    return "?" if math.isnan(x) else format_bytes(int(x))
