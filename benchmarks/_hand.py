"""Hand-written JAX references shared by ``bench_layers.py`` and ``bench_peers.py``: the
``lax``/``jnp`` code a careful JAX user writes for a layer, over metoryx's parameter dicts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

EPSILON = 1e-5  # the normalizations' epsilon on every side
MOMENTUM = 0.9  # BatchNorm: the weight of the old running statistics (PyTorch's 0.1)


def hand_dense(p: Any, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def standardize(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    mean = x.mean(axes, keepdims=True)
    centered = x - mean
    return centered * lax.rsqrt(jnp.square(centered).mean(axes, keepdims=True) + EPSILON)


def hand_layer_norm(p: Any, x: jax.Array) -> jax.Array:
    return standardize(x, (-1,)) * p["scale"] + p["bias"]


def hand_rms_norm(p: Any, x: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + 1e-6) * p["scale"]


def hand_batch_norm(p: Any, state: dict[str, Any], x: jax.Array) -> tuple[jax.Array, dict]:
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    centered = x - mean
    var = jnp.square(centered).mean(axes)
    y = centered * (lax.rsqrt(var + EPSILON) * p["scale"]) + p["bias"]
    n = x.size // x.shape[-1]
    stats = state["batch_stats"]
    new_stats = {
        "mean": MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
        "var": MOMENTUM * stats["var"] + (1 - MOMENTUM) * var * (n / (n - 1)),
    }
    return y, {"batch_stats": new_stats}


def gru_step(cell: Any, h: jax.Array, xp: jax.Array) -> tuple[jax.Array, jax.Array]:
    xr, xz, xn = jnp.split(xp, 3, -1)
    hr, hz, hn = jnp.split(h @ cell["recurrent_kernel"] + cell["recurrent_bias"], 3, -1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    h = (1 - z) * jnp.tanh(xn + r * hn) + z * h
    return h, h
