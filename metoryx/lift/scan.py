"""``mx.scan`` and ``mx.Repeat``: one module applied step after step with one ``lax.scan``.

``mx.Repeat(layer, n)`` is the deep-model case: ``n`` copies of a layer, their variables
stacked on a leading axis, applied one after the other. The compiled program holds one copy of
the layer's body in a loop, so a 48-block transformer compiles about as fast as a 2-block one.
``mx.scan(module)`` is the general form: a module ``(carry, x) -> (carry, y)`` scanned over a
sequence, its variables shared by every step or stacked one copy per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.arguments import bool_argument
from metoryx._core.lifting import (
    ALL,
    Region,
    check_split_rngs,
    check_variable_axes,
    plan_of,
    running,
    stacked_copies,
)
from metoryx._core.module import Lifted, Module, module_label

Step = Callable[[Module, Any, Any], tuple[Any, Any]]


def run_scan(wrapper: Any, transform: str, step: Step, carry: Any, xs: Any) -> tuple[Any, Any]:
    """Scan ``step(module, carry, x) -> (carry, y)`` of ``wrapper.module`` over ``xs``.

    Each step sees its copy of the stacked variables, the carried value of the shared mutable
    State, and a copy index for the split rng streams; what it assigns and sows comes out as
    the carry (shared State) or stacked outputs (stacked State, sown values).
    """
    owner, parent = running(wrapper, transform)
    plan = plan_of(wrapper)
    length = _length(wrapper, transform, xs)
    region = Region(owner, parent, transform, plan.owned, wrapper.split_rngs, length, True)
    stacked = set(plan.stacked)

    def body(c: Any, x: Any) -> tuple[Any, Any]:
        user_carry, shared = c
        user_x, own, index = x
        with region.body({**own, **shared}, index) as child:
            user_carry, y = step(wrapper.module, user_carry, user_x)
        shared = {s: child.values[s] for s in plan.carried}
        updated = {s: child.values[s] for s in child.written if s in stacked}
        return (user_carry, shared), (y, updated, child.captured)

    if wrapper.remat:
        body = jax.checkpoint(body, policy=wrapper.policy, prevent_cse=wrapper.prevent_cse)
    init = (carry, {s: parent.values[s] for s in plan.carried})
    scanned = (xs, {s: parent.values[s] for s in plan.stacked}, jnp.arange(length, dtype=np.uint32))
    try:
        (carry, shared), (ys, updated, captured) = lax.scan(
            body, init, scanned, length=length, reverse=wrapper.reverse, unroll=wrapper.unroll
        )
    except TypeError as e:
        if "carry" not in str(e):
            raise
        raise errors.InputShapeError(
            f"{module_label(wrapper)}: every step must return a carry of the structure, shapes "
            f"and dtypes it was given (for mx.Repeat: the layer must return an array like its "
            f"input), so that the steps can be chained. JAX reports: {e}"
        ) from None
    written = {s: shared[s] for s in plan.carried if s in region.written}
    region.finish({**written, **updated}, captured)
    return carry, ys


def _length(wrapper: Any, transform: str, xs: Any) -> int:
    """The number of steps: the wrapper's, else the leading axis of ``xs``; all must agree."""
    sizes = {int(np.shape(leaf)[0]) for leaf in jax.tree.leaves(xs) if np.ndim(leaf) > 0}
    if any(np.ndim(leaf) == 0 for leaf in jax.tree.leaves(xs)):
        sizes.add(-1)
    expected = wrapper.length
    if (expected is not None and sizes - {expected}) or (expected is None and len(sizes) != 1):
        given = sorted(sizes) if sizes else "none (no arrays are scanned)"
        if expected is not None:
            runs, fix = f"{expected} steps", f"a leading axis of {expected}"
        else:
            runs, fix = "one step per item", "the same leading size, or pass length=..."
        raise errors.InputShapeError(
            f"{module_label(wrapper)}: {transform} runs {runs} of the scanned inputs' leading "
            f"axis; their leading sizes are {given}. Give every scanned input {fix}."
        )
    return expected if expected is not None else sizes.pop()


class Scan(Lifted):
    """A module ``(carry, x) -> (carry, y)`` scanned over a sequence; made by :func:`scan`.

    Attributes:
        module: the wrapped module, a plain layer in the definition world: edit it, or reach
            its sub-modules and variables, through this attribute
            (``model.rnn.module.fc``). Its variables sit at the wrapper's own path
            (``rnn/fc/kernel``, not ``rnn/module/fc/kernel``).
        length: the number of steps, or None when each call takes it from ``xs``.
    """

    def __init__(
        self,
        module: Module,
        length: int | None,
        variable_axes: Any,
        split_rngs: Any,
        reverse: bool,
        unroll: int | bool,
        remat: bool,
        policy: Callable[..., bool] | None,
    ):
        where = f"mx.scan({type(module).__name__})"
        _check_module(where, module)
        self.module = module
        self.length = None if length is None else _check_length(where, length)
        self.variable_axes = check_variable_axes(where, variable_axes, length)
        self.split_rngs = check_split_rngs(where, split_rngs)
        self.reverse = bool_argument(where, "reverse", reverse)
        self.unroll = _check_unroll(where, unroll)
        self.remat = bool_argument(where, "remat", remat)
        self.policy = _check_policy(where, policy)
        self.prevent_cse = False  # inside lax.scan, CSE across steps cannot happen

    def copies(self, collection: str) -> int | None:
        return stacked_copies(self.variable_axes, self.length, collection)

    def isolates(self) -> bool:
        return bool(self.variable_axes)

    def extra_repr(self) -> str:
        axes = f", variable_axes={self.variable_axes}" if self.variable_axes else ""
        return f"length={self.length}{axes}, reverse={self.reverse}"

    def __call__(self, carry: Any, xs: Any = None) -> tuple[Any, Any]:
        """Run the module over the leading axis of ``xs``.

        Args:
            carry: the first step's carry (any PyTree of arrays).
            xs: the inputs, each with a leading axis of one item per step, or ``None`` (then
                ``length`` says how many steps).

        Returns:
            ``(carry, ys)``: the last step's carry, and the steps' outputs stacked.
        """
        return run_scan(self, "mx.scan", lambda m, c, x: m(c, x), carry, xs)


def scan(
    module: Module,
    *,
    length: int | None = None,
    variable_axes: dict[str, int | None] | None = None,
    split_rngs: bool | Sequence[str] = True,
    reverse: bool = False,
    unroll: int | bool = 1,
    remat: bool = False,
    policy: Callable[..., bool] | None = None,
) -> Scan:
    """A module whose call scans ``module(carry, x) -> (carry, y)`` over a sequence.

    The result is a module: assign it in ``__init__`` (``self.cell = mx.scan(Cell(...))``) and
    call it as ``carry, ys = self.cell(carry, xs)``, one ``lax.scan`` in the compiled program.
    The wrapped module's variables keep their paths (the wrapper adds no path part).

    - Variables are shared by every step unless ``variable_axes`` stacks their collection:
      ``{"params": 0}`` keeps one copy per step, on a leading axis of size ``length``, each
      copy initialized with the key of its unrolled path (``cell/3/kernel``).
    - Mutable State that is shared is carried from step to step; stacked State is updated per
      step. Assigning State of a module outside ``module`` raises.
    - Random streams in ``split_rngs`` (all by default) give each step its own keys; the others
      give every step the same keys.
    - ``mx.sow`` inside records one value per step, stacked.

    Args:
        module: the module to scan; its ``__call__(carry, x)`` returns ``(carry, y)``.
        length: the number of steps; required when ``variable_axes`` stacks a collection,
            else taken from ``xs``.
        variable_axes: ``{collection: 0}`` for the collections kept per step; the others are
            shared.
        split_rngs: ``True`` (every stream), ``False`` (none) or the stream names to split.
        reverse: scan from the last item to the first (outputs stay in input order).
        unroll: steps per iteration of the compiled loop, as in ``lax.scan``.
        remat: rematerialize each step in the backward pass (``jax.checkpoint`` of the step).
        policy: with ``remat``, a ``jax.checkpoint_policies`` policy of what to save.

    Returns:
        The wrapping module (a ``Scan``), whose ``.module`` is ``module``.

    Raises:
        LayerConfigError: for an invalid configuration.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Accumulate(mx.Module):
        ...     def __init__(self):
        ...         self.fc = mx.Dense(3, 3)
        ...     def __call__(self, h, x):
        ...         h = jnp.tanh(self.fc(h) + x)
        ...         return h, h
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.rnn = mx.scan(Accumulate())
        ...     def __call__(self, xs):
        ...         return self.rnn(jnp.zeros(3), xs)
        >>> init_fn, apply_fn = mx.transform(Net())
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["rnn"]["fc"]["kernel"].shape
        (3, 3)
        >>> (h, hs), _ = apply_fn(variables, None, jnp.ones((5, 3)))
        >>> hs.shape
        (5, 3)
    """
    return Scan(module, length, variable_axes, split_rngs, reverse, unroll, remat, policy)


class Repeat(Lifted):
    """``n`` copies of a layer applied one after the other, compiled as one loop.

    The copies' variables are stacked on a leading axis (``blocks/kernel`` has shape
    ``(n, ...)``), and the call is one ``lax.scan`` whose body is the layer: the compiled
    program holds the layer once, whatever ``n``, so deep models compile in the time of a
    shallow one. Each copy is initialized with the key of its path in the unrolled layout
    (``blocks/3/kernel``), so ``mx.unstack(model, init_fn(key))`` equals the init of a model
    holding a list of ``n`` layers; ``mx.stack``/``mx.unstack`` convert checkpoints between
    the two layouts.

    Each copy has its own random keys (split streams) and its own mutable State (e.g.
    ``BatchNorm`` statistics or an attention cache, stacked like the parameters). ``mx.sow``
    inside records one value per copy, stacked.

    Args:
        layer: the layer, or a function without arguments that makes it; its ``__call__(x,
            *per_layer, **kwargs)`` must return an array (or PyTree) like ``x``.
        n: the number of copies.
        remat: rematerialize each copy in the backward pass (``jax.checkpoint`` of the loop
            body): the forward activations inside a layer are recomputed instead of stored.
        policy: with ``remat``, a ``jax.checkpoint_policies`` policy of what to save.
        unroll: copies per iteration of the compiled loop, as in ``lax.scan`` (``True``: all,
            which compiles like an unrolled model).
        split_rngs: ``True`` (each copy gets its own keys from every stream), ``False`` or the
            stream names to split.

    Call:
        ``repeat(x, *per_layer, **kwargs)``: ``per_layer`` arrays have a leading axis of size
        ``n`` and copy ``i`` gets item ``i`` (a per-layer mask, a per-layer scale);
        ``kwargs`` go to every copy unchanged (e.g. ``is_training=True``).

    Attributes:
        module: the layer, one template for the ``n`` copies; a plain layer in the definition
            world. Edit it, or reach its sub-modules and variables, through this attribute
            (``model.blocks.module.fc``): a change applies to every copy, and a ``.value``
            fixed on one of its variables is the start of every copy. Its variables sit at
            the wrapper's own path (``blocks/fc/kernel``, not ``blocks/module/fc/kernel``),
            with the copies on a leading axis.
        n: the number of copies.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> blocks = mx.Repeat(lambda: mx.Dense(4, 4), 6)
        >>> init_fn, apply_fn = mx.transform(blocks)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["kernel"].shape
        (6, 4, 4)
        >>> y, _ = jax.jit(apply_fn)(variables, None, jnp.ones((2, 4)))
        >>> y.shape
        (2, 4)
        >>> blocks.module.kernel.shape  # the template: one copy's shape
        (4, 4)
    """

    def __init__(
        self,
        layer: Module | Callable[[], Module],
        n: int,
        remat: bool = False,
        policy: Callable[..., bool] | None = None,
        unroll: int | bool = 1,
        split_rngs: bool | Sequence[str] = True,
    ):
        module = layer if isinstance(layer, Module) else _made(layer)
        where = f"mx.Repeat({type(module).__name__})"
        _check_module(where, module)
        self.module = module
        self.length = _check_length(where, n)
        self.remat = bool_argument(where, "remat", remat)
        self.policy = _check_policy(where, policy)
        self.prevent_cse = False
        self.unroll = _check_unroll(where, unroll)
        self.reverse = False
        self.split_rngs = check_split_rngs(where, split_rngs)

    @property
    def n(self) -> int:
        """The number of copies."""
        return self.length

    def copies(self, collection: str) -> int | None:
        return stacked_copies(ALL, self.length, collection)

    def isolates(self) -> bool:
        return True

    def extra_repr(self) -> str:
        return f"n={self.length}" + (", remat=True" if self.remat else "")

    def __call__(self, x: Any, *per_layer: Any, **kwargs: Any) -> Any:
        """Apply the ``n`` copies in order: ``x = layer_i(x, *per_layer[i], **kwargs)``."""

        def step(module: Module, carry: Any, items: tuple[Any, ...]) -> tuple[Any, None]:
            return module(carry, *items, **kwargs), None

        x, _ = run_scan(self, "mx.Repeat", step, x, per_layer)
        return x


def _check_module(where: str, module: Any) -> None:
    if not isinstance(module, Module):
        raise errors.LayerConfigError(
            f"{where}: expected an mx.Module (or, for mx.Repeat, a function that makes one), "
            f"got {type(module).__name__}. Wrap plain functions in mx.Lambda."
        )


def _made(factory: Any) -> Any:
    """What ``factory()`` makes, if ``factory`` is a function of no arguments; else itself,
    for ``_check_module`` to name."""
    if not callable(factory):
        return factory
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise errors.LayerConfigError(
            f"mx.Repeat: `layer` must be a module or a function of no arguments that makes "
            f"one (e.g. lambda: Block(64)), got {factory!r:.60}, which takes arguments."
        ) from None
    except ValueError:  # no signature to read (some builtins): just call it
        pass
    return factory()


def _check_unroll(where: str, unroll: Any) -> int | bool:
    """``unroll`` as ``jax.lax.scan`` takes it: a positive int, or a bool (True: all steps)."""
    if isinstance(unroll, (bool, np.bool_)):
        return bool(unroll)
    if not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise errors.LayerConfigError(
            f"{where}: `unroll` must be a positive int (steps per loop iteration) or a bool "
            f"(True unrolls every step), got {unroll!r:.40}."
        )
    return int(unroll)


def _check_policy(where: str, policy: Any) -> Any:
    if policy is not None and not callable(policy):
        raise errors.LayerConfigError(
            f"{where}: `policy` must be None or a policy of jax.checkpoint_policies such as "
            f"dots_saveable, got {policy!r:.60}."
        )
    return policy


def _check_length(where: str, length: Any) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise errors.LayerConfigError(
            f"{where}: the number of copies/steps must be a positive int, got {length!r}."
        )
    if length >= 2**63:  # the leading axis of the stacked variables: no array has one so long
        raise errors.LayerConfigError(
            f"{where}: the number of copies/steps must be below 2**63 (it is the leading axis "
            f"of the stacked variables), got {length!r}."
        )
    return int(length)
