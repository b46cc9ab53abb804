"""The JAX and NumPy names the core uses whose own stubs hold an ``Unknown`` type.

pyright's strict rules refuse any use of such a function, even where the call's own types are
clear. jaxlib's compiled module has no stubs, so its ``Device`` and ``PyTreeDef`` are Unknown,
and with them ``jnp.asarray``, ``jnp.array``, ``jax.jit`` and ``jax.tree_util``; a few functions
leave parameters unannotated (``lax.map``, ``lax.gather``'s ``fill_value``,
``jax.config.read``); NumPy 2.5's ``ArrayLike`` holds ``collections.abc.Buffer``, which pyright
checking for Python 3.11 cannot see. ``Tracer`` is generic, so ``isinstance(x, Tracer)`` makes
``x`` a ``Tracer[Unknown]``. A typed alias in the calling file does not help: pyright reports
the access to the original there.

So each is declared here once, for the type checker, with the parameters the core passes and
a precise result. At run time each name is the very object JAX or NumPy exports (imported, not
wrapped; ``config_read`` is the bound ``jax.config.read``), so a call costs what it did.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from metoryx._core import typed
    >>> typed.jnp_asarray is jnp.asarray and typed.np_shape is np.shape
    True
    >>> typed.np_concatenate is np.concatenate
    True
    >>> typed.tree_flatten is jax.tree_util.tree_flatten and typed.jit is jax.jit
    True
    >>> typed.Tracer is jax.core.Tracer
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Tracer",
    "config_read",
    "get_opaque_trace_state",
    "jit",
    "jnp_array",
    "jnp_asarray",
    "lax_broadcast",
    "lax_fori_loop",
    "lax_gather",
    "lax_map",
    "np_concatenate",
    "np_iscomplexobj",
    "np_shape",
    "register_pytree_node",
    "register_pytree_with_keys",
    "tree_flatten",
    "tree_unflatten",
]

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import ParamSpec, TypeVar

    import jax
    import numpy as np
    from jax import core, lax
    from jax.typing import ArrayLike, DTypeLike

    P = ParamSpec("P")
    R = TypeVar("R")
    T = TypeVar("T")

    # Tracer is generic in its trace type, and isinstance(x, Tracer) narrows x to
    # Tracer[Unknown] whatever the class object is declared as; a subclass fixes the argument.
    class Tracer(core.Tracer[Any]): ...

    def jnp_asarray(
        a: Any, dtype: DTypeLike | None = None, *, copy: bool | None = None
    ) -> jax.Array: ...

    def jnp_array(
        object: Any, dtype: DTypeLike | None = None, *, copy: bool = True
    ) -> jax.Array: ...

    def np_shape(a: Any, /) -> tuple[int, ...]: ...

    def np_iscomplexobj(x: Any, /) -> bool: ...

    def np_concatenate(arrays: Sequence[np.ndarray[Any, Any]], /) -> np.ndarray[Any, Any]: ...

    def jit(fun: Callable[P, R], /) -> Callable[P, R]: ...

    def lax_map(f: Callable[[Any], Any], xs: Any, /) -> Any: ...

    def lax_broadcast(operand: Any, sizes: Sequence[int], /) -> jax.Array: ...

    def lax_fori_loop(
        lower: int, upper: int, body_fun: Callable[[Any, T], T], init_val: T, /
    ) -> T: ...

    def lax_gather(
        operand: ArrayLike,
        start_indices: ArrayLike,
        dimension_numbers: lax.GatherDimensionNumbers,
        slice_sizes: Sequence[int],
        *,
        unique_indices: bool = False,
        indices_are_sorted: bool = False,
        mode: str | lax.GatherScatterMode | None = None,
    ) -> jax.Array: ...

    def config_read(name: str, /) -> Any: ...

    def get_opaque_trace_state(convention: str | None = None) -> object: ...

    # A treedef is a jaxlib PyTreeDef, which has no type here: Any.
    def tree_flatten(tree: Any, /) -> tuple[list[Any], Any]: ...

    def tree_unflatten(treedef: Any, leaves: Iterable[Any], /) -> Any: ...

    # The unflatten functions return Any: ours rebuild a builtin, not the registered type.
    def register_pytree_node(
        nodetype: type[T],
        flatten_func: Callable[[T], tuple[Iterable[Any], Any]],
        unflatten_func: Callable[[Any, Iterable[Any]], Any],
        /,
    ) -> None: ...

    def register_pytree_with_keys(
        nodetype: type[T],
        flatten_with_keys: Callable[[T], tuple[Iterable[tuple[Any, Any]], Any]],
        unflatten_func: Callable[[Any, Iterable[Any]], Any],
        flatten_func: Callable[[T], tuple[Iterable[Any], Any]],
        /,
    ) -> None: ...

else:
    from jax import config, jit
    from jax.core import Tracer
    from jax.extend.core import get_opaque_trace_state
    from jax.lax import broadcast as lax_broadcast
    from jax.lax import fori_loop as lax_fori_loop
    from jax.lax import gather as lax_gather
    from jax.lax import map as lax_map
    from jax.numpy import array as jnp_array
    from jax.numpy import asarray as jnp_asarray
    from jax.tree_util import (
        register_pytree_node,
        register_pytree_with_keys,
        tree_flatten,
        tree_unflatten,
    )
    from numpy import concatenate as np_concatenate
    from numpy import iscomplexobj as np_iscomplexobj
    from numpy import shape as np_shape

    config_read = config.read
