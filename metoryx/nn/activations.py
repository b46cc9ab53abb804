"""Activation functions: JAX's own, re-exported unchanged (each keeps its JAX docstring).

=================  ==============================================================
``relu``           ``max(x, 0)``
``relu6``          ``min(max(x, 0), 6)``
``gelu``           Gaussian error linear unit; ``approximate=True`` (tanh form) by
                   default, unlike PyTorch: pass ``approximate=False`` for its
                   exact (erf) form
``silu``/``swish`` ``x * sigmoid(x)`` (two names of one function)
``sigmoid``        ``1 / (1 + exp(-x))``
``tanh``           hyperbolic tangent (``jax.numpy.tanh``)
``softmax``        ``exp(x) / sum(exp(x))`` along ``axis`` (default -1)
``log_softmax``    ``x - logsumexp(x)`` along ``axis`` (default -1)
``elu``            ``x`` if ``x > 0`` else ``alpha * (exp(x) - 1)``
``selu``           scaled ELU with the self-normalizing constants
``celu``           continuously differentiable ELU
``leaky_relu``     ``x`` if ``x >= 0`` else ``negative_slope * x`` (default 0.01)
``softplus``       ``log(1 + exp(x))``
``log_sigmoid``    ``-softplus(-x)``
``hard_tanh``      ``x`` clipped to ``[-1, 1]``
``glu``            gated linear unit: halves ``x`` along ``axis``, ``a * sigmoid(b)``
=================  ==============================================================

Example:
    >>> import jax.numpy as jnp, metoryx as mx
    >>> x = jnp.array([-2.0, 0.0, 3.0])
    >>> mx.relu(x)
    Array([0., 0., 3.], dtype=float32)
    >>> mx.softmax(jnp.zeros(4))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
"""

from jax.nn import (
    celu,
    elu,
    gelu,
    glu,
    hard_tanh,
    leaky_relu,
    log_sigmoid,
    log_softmax,
    relu,
    relu6,
    selu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swish,
)
from jax.numpy import tanh

__all__ = [
    "celu",
    "elu",
    "gelu",
    "glu",
    "hard_tanh",
    "leaky_relu",
    "log_sigmoid",
    "log_softmax",
    "relu",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "swish",
    "tanh",
]
