"""What layers share: the dtype rules, the bias add that traces like hand-written code, and the
default kernel initializer."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from metoryx import initializers

#: The default kernel initializer of Dense, Conv, ConvTranspose and MLP: LeCun normal.
DEFAULT_KERNEL_INIT = initializers.lecun_normal()


def compute_dtype(dtype: Any, *arrays: jax.Array | None) -> jnp.dtype:
    """The dtype a layer computes in: ``dtype`` if given, else the promotion of ``arrays``.

    The promotion uses JAX's standard lattice even under ``jax_numpy_dtype_promotion="strict"``:
    the layer casts explicitly, so a bfloat16 parameter meeting a float32 input is a decision
    made here (float32), not an implicit promotion.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    dtypes = {a.dtype for a in arrays if a is not None}
    if len(dtypes) == 1:
        return dtypes.pop()
    with jax.numpy_dtype_promotion("standard"):
        return functools.reduce(jnp.promote_types, dtypes)


def at_least_float32(dtype: Any) -> jnp.dtype:
    """float32 for narrower floats (bfloat16, float16), the dtype itself if wider: the dtype
    of statistics (norms, means, variances) that half precision would get wrong."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)


def cast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` in ``dtype``, adding no operation to the program when it already is."""
    return x if x.dtype == dtype else x.astype(dtype)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over the last axis, exactly as a hand-written ``y + bias`` traces.

    The rank promotion is ours to make, so it is allowed here even when the user runs with
    ``jax_numpy_rank_promotion="raise"``: the same two equations (``broadcast_in_dim``, ``add``)
    on every JAX version and one eager dispatch. (A ``jit(inline=True)`` helper is no longer
    inlined into jaxprs by JAX 0.12, and ``lax.broadcast_to_rank`` costs a second dispatch.)
    """
    if jax.config.jax_numpy_rank_promotion == "allow":  # the default: no context to enter
        return y + bias
    with jax.numpy_rank_promotion("allow"):
        return y + bias
