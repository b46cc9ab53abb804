"""Activations: JAX's own functions, re-exported unchanged, and the PReLU layer.

The functions are JAX's own objects (from ``jax.nn``, and ``jax.numpy.tanh``), each with its
JAX docstring: ``mx.relu is jax.nn.relu``. ``PReLU``, whose negative slope is learned, is a
module defined here (see its docstring).

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

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter
from metoryx.nn._arguments import check_number, positive_int
from metoryx.nn._compute import cast, compute_dtype, layer_dtype

__all__ = [
    "PReLU",
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


class PReLU(Module):
    """Parametric ReLU: ``x`` where ``x > 0``, else ``weight * x``, with the slope learned.

    ``size=1`` learns one slope shared by every element; ``size=C`` learns one slope per
    channel, the last axis of the input (which must then have ``C`` entries). This is
    ``torch.nn.PReLU(num_parameters=size, init=init_value)``, with channels last instead of
    on axis 1. As in PyTorch, the gradient at ``x == 0`` is that of the negative side.

    The slopes are the parameter ``weight`` of shape ``(size,)``, every entry ``init_value``
    at the start.

    Args:
        size: number of slopes: 1 (shared) or the number of channels.
        init_value: the starting value of every slope, a finite number.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if ``size`` is not a positive int or ``init_value`` is not a
            finite number.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.PReLU(3))
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["weight"]
        Array([0.25, 0.25, 0.25], dtype=float32)
        >>> y, _ = apply_fn(variables, None, jnp.array([[-4.0, 0.0, 4.0]]))
        >>> y
        Array([[-1.,  0.,  4.]], dtype=float32)
    """

    def __init__(
        self,
        size: int = 1,
        init_value: float = 0.25,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self.size = positive_int("PReLU", "size", size)
        init_value = check_number(
            "PReLU", "init_value", init_value, fix="Pass a slope such as init_value=0.25."
        )
        self.dtype = layer_dtype("PReLU", dtype)
        self.weight = Parameter(initializers.constant(init_value), (self.size,), param_dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}"

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the activation.

        Args:
            x: input of any shape when ``size == 1``, else of shape ``(*batch, size)``.

        Returns:
            An array of the shape of ``x`` and the computation dtype.

        Raises:
            InputShapeError: if ``size > 1`` and the last axis of ``x`` is not ``size`` long.
        """
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        if self.size == 1:
            shape: tuple[int, ...] = (1,) * x.ndim
        elif x.ndim and x.shape[-1] == self.size:
            shape = (*(1,) * (x.ndim - 1), self.size)
        else:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape (..., {self.size}) whose "
                f"last axis holds the size={self.size} channels, got shape {x.shape}. Put the "
                f"channels on the last axis (PyTorch puts them on axis 1), or build PReLU with "
                f"size=1 for one shared slope."
            )
        weight = self.weight
        dtype = compute_dtype(self.dtype, x, weight)
        x = cast(x, dtype)
        return jnp.where(x > 0, x, cast(weight, dtype).reshape(shape) * x)
