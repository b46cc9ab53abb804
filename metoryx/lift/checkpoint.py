"""``mx.checkpoint``: rematerialization (``jax.checkpoint``) of a sub-module inside apply.

The wrapped code runs under ``jax.checkpoint``: its forward activations are not kept for the
backward pass but recomputed from its inputs, trading compute for memory. Random keys drawn
inside are the keys the unwrapped code draws, State assigned inside is assigned, and values
sown inside are recorded: the result is the unwrapped computation, with less memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from metoryx import errors
from metoryx._core.context import innermost_frame
from metoryx._core.lifting import Region
from metoryx._core.module import BINDING, Lifted, Module

Policy = Callable[..., bool] | None


def checkpoint(
    module_or_fn: Any,
    policy: Policy = None,
    prevent_cse: bool = True,
    static_argnums: int | Sequence[int] = (),
) -> Any:
    """Rematerialize a module or function: recompute its activations in the backward pass.

    - Given a module in the definition world (``self.block = mx.checkpoint(Block())``), it
      returns a module that calls ``Block`` under ``jax.checkpoint``; the block's variables
      keep their paths (the wrapper adds no path part).
    - Given a callable inside a model's method (``mx.checkpoint(self.block)(x)``, a bound
      method or a function of your own), it returns that function under ``jax.checkpoint``.

    State updates, random keys (the same ones the unwrapped code draws) and ``mx.sow`` work
    inside, as without the wrapper.

    Args:
        module_or_fn: the module or the callable to rematerialize.
        policy: which intermediate values may be saved rather than recomputed, e.g.
            ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``; ``None`` saves
            nothing but the inputs.
        prevent_cse: as in ``jax.checkpoint``: keep XLA from merging the recomputation with the
            forward pass. ``False`` is safe and faster inside ``lax.scan`` (mx.Repeat's
            ``remat=True`` does this).
        static_argnums: positional arguments that are Python values, not arrays.

    Returns:
        For a module, a module (a ``Checkpointed``) whose ``.module`` is ``module_or_fn``; for
        a function, a function with the same signature.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.block = mx.checkpoint(mx.MLP(4, [16, 16], 4))
        ...     def __call__(self, x):
        ...         return self.block(x).sum()
        >>> init_fn, apply_fn = mx.transform(Net())
        >>> variables = init_fn(jax.random.key(0))
        >>> sorted(variables["params"]["block"]["layers"])
        ['0', '1', '2']
        >>> loss = lambda p: apply_fn({"params": p}, None, jnp.ones((2, 4)))[0]
        >>> grads = jax.grad(loss)(variables["params"])
        >>> grads["block"]["layers"]["0"]["kernel"].shape
        (4, 16)
    """
    statics = _static_argnums(static_argnums)
    if policy is not None and not callable(policy):
        raise errors.LayerConfigError(
            f"mx.checkpoint: `policy` must be None (save nothing) or a policy of "
            f"jax.checkpoint_policies such as dots_saveable, got {policy!r:.60}."
        )
    if not isinstance(prevent_cse, bool):
        raise errors.LayerConfigError(
            f"mx.checkpoint: `prevent_cse` must be a bool, got {prevent_cse!r:.60}."
        )
    if isinstance(module_or_fn, Module) and BINDING not in module_or_fn.__dict__:
        return Checkpointed(module_or_fn, policy, prevent_cse, statics)
    if not callable(module_or_fn):
        raise errors.LayerConfigError(
            f"mx.checkpoint expects a module or a callable, got {type(module_or_fn).__name__}."
        )
    return rematerialized(module_or_fn, policy, prevent_cse, statics)


def _static_argnums(value: Any) -> tuple[int, ...]:
    items = (value,) if not isinstance(value, (list, tuple)) else value
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise errors.LayerConfigError(
            f"mx.checkpoint: `static_argnums` must be an int or a tuple of ints (the positions "
            f"of arguments that are Python values), got {value!r:.60}. Pass e.g. "
            f"static_argnums=(1,)."
        )
    return tuple(items)


def rematerialized(
    fn: Callable[..., Any], policy: Policy, prevent_cse: bool, static_argnums: tuple[int, ...]
) -> Callable[..., Any]:
    """``fn`` under ``jax.checkpoint``, carrying State, keys and sown values of apply_fn."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        found = innermost_frame()
        checkpoint = functools.partial(
            jax.checkpoint, policy=policy, prevent_cse=prevent_cse, static_argnums=static_argnums
        )
        if found is None:  # outside apply_fn: a plain jax.checkpoint
            return checkpoint(fn)(*args, **kwargs)
        region = Region(*found, "mx.checkpoint")

        def body(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
            with region.body() as child:
                out = fn(*args, **kwargs)
            return out, {s: child.values[s] for s in child.written}, child.captured

        out, written, captured = checkpoint(body)(*args, **kwargs)
        region.finish(written, captured)
        return out

    return call


class Checkpointed(Lifted):
    """A module called under ``jax.checkpoint``; made by :func:`checkpoint`.

    Attributes:
        module: the wrapped module, a plain layer in the definition world: edit it, or reach
            its sub-modules and variables, through this attribute
            (``model.block.module.layers``). Its variables sit at the wrapper's own path
            (``block/layers/0/kernel``, not ``block/module/layers/0/kernel``).
    """

    def __init__(
        self, module: Module, policy: Policy, prevent_cse: bool, static_argnums: tuple[int, ...]
    ):
        self.module = module
        self.policy = policy
        self.prevent_cse = bool(prevent_cse)
        self.static_argnums = static_argnums

    def extra_repr(self) -> str:
        return "" if self.policy is None else f"policy={getattr(self.policy, '__name__', '?')}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module, rematerialized in the backward pass."""
        fn = rematerialized(self.module, self.policy, self.prevent_cse, self.static_argnums)
        return fn(*args, **kwargs)
