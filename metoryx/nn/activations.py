"""Activations: JAX's own functions, re-exported or checked, and the PReLU layer.

The functions without configuration are JAX's own objects (from ``jax.nn``, and
``jax.numpy.tanh``), each with its JAX docstring: ``mx.relu is jax.nn.relu``. Those that take
a configuration argument (``leaky_relu``, ``elu``, ``celu``, ``glu``, ``softmax``,
``log_softmax``, ``gelu``) are thin wrappers that check it (a ``LayerConfigError`` names the
function, the argument, what it must be and what was given) and call JAX's function with the
same arguments: the same program, the same values. ``PReLU``, whose negative slope is learned,
is a module defined here (see its docstring).

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

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import (
    hard_tanh,
    log_sigmoid,
    relu,
    relu6,
    selu,
    sigmoid,
    silu,
    softplus,
    swish,
)
from jax.numpy import tanh

from metoryx import errors, initializers
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, function_label, module_label
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


# The functions that take configuration: checked here, computed by JAX's own.


def leaky_relu(x: jax.Array, negative_slope: Any = 0.01) -> jax.Array:
    """``x`` where ``x >= 0``, else ``negative_slope * x``: ``jax.nn.leaky_relu``, checked.

    Args:
        x: the input, of any shape.
        negative_slope: a finite real number, or a real array that broadcasts to the shape of
            ``x`` (e.g. one slope per channel, traced is fine).

    Returns:
        An array of the shape of ``x``.

    Raises:
        LayerConfigError: if ``negative_slope`` is neither.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.leaky_relu(jnp.array([-2.0, 3.0]), negative_slope=0.1)
        Array([-0.2,  3. ], dtype=float32)
    """
    slope = _coefficient("leaky_relu", "negative_slope", negative_slope, x)
    # JAX's default is a constant of its program; a value passed is an argument of its jit.
    return jax.nn.leaky_relu(x) if _is(slope, 0.01) else jax.nn.leaky_relu(x, slope)


def elu(x: jax.Array, alpha: Any = 1.0) -> jax.Array:
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``: ``jax.nn.elu``, checked.

    Args:
        x: the input, of any shape.
        alpha: a finite real number, or a real array that broadcasts to the shape of ``x``.

    Returns:
        An array of the shape of ``x``.

    Raises:
        LayerConfigError: if ``alpha`` is neither.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.elu(jnp.array([0.0, 2.0]), alpha=0.5)
        Array([0., 2.], dtype=float32)
    """
    alpha = _coefficient("elu", "alpha", alpha, x)
    return jax.nn.elu(x) if _is(alpha, 1.0) else jax.nn.elu(x, alpha)


def celu(x: jax.Array, alpha: Any = 1.0) -> jax.Array:
    """``max(x, 0) + alpha * min(exp(x / alpha) - 1, 0)``: ``jax.nn.celu``, checked.

    Args:
        x: the input, of any shape.
        alpha: a finite nonzero real number (``x`` is divided by it), or a real array that
            broadcasts to the shape of ``x``.

    Returns:
        An array of the shape of ``x``.

    Raises:
        LayerConfigError: if ``alpha`` is neither, or 0.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.celu(jnp.array([0.0, 2.0]), alpha=0.5)
        Array([0., 2.], dtype=float32)
    """
    alpha = _coefficient("celu", "alpha", alpha, x)
    if isinstance(alpha, float) and alpha == 0.0:
        raise errors.LayerConfigError(
            f"{function_label('celu')}: `alpha` must not be 0: celu divides x by it. Pass e.g. "
            f"alpha=1.0 (PyTorch's default)."
        )
    return jax.nn.celu(x) if _is(alpha, 1.0) else jax.nn.celu(x, alpha)


def glu(x: jax.Array, axis: int = -1) -> jax.Array:
    """Gated linear unit: ``a * sigmoid(b)`` for the halves ``a, b`` of ``x`` along ``axis``:
    ``jax.nn.glu``, checked.

    Args:
        x: the input; its ``axis`` has an even size.
        axis: the axis to halve, an int in ``[-x.ndim, x.ndim)``.

    Returns:
        An array of the shape of ``x`` with ``axis`` halved.

    Raises:
        LayerConfigError: if ``axis`` is not an int or not an axis of ``x``.
        InputShapeError: if the size of ``x`` along ``axis`` is odd.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.glu(jnp.array([[1.0, 2.0, 0.0, 0.0]])).tolist()
        [[0.5, 1.0]]
    """
    shape = np.shape(x)
    axis = _axis("glu", axis, len(shape))
    if shape[axis] % 2:
        raise errors.InputShapeError(
            f"{function_label('glu')}: axis {axis} of the input (shape {shape}) has the odd size "
            f"{shape[axis]}; glu halves it into a value and a gate. Give it an even size, or "
            f"pass the axis that holds the two halves."
        )
    return jax.nn.glu(x, axis)


def softmax(x: jax.Array, axis: Any = -1, where: Any = None) -> jax.Array:
    """``exp(x) / sum(exp(x))`` along ``axis``: ``jax.nn.softmax``, checked.

    Args:
        x: the input, of any shape.
        axis: an axis of ``x``, a tuple (or list) of distinct axes, or None for all of them.
        where: elements to include (as in JAX); the output of a masked-out element is 0.

    Returns:
        An array of the shape of ``x`` whose entries along ``axis`` sum to 1.

    Raises:
        LayerConfigError: if ``axis`` is none of those.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.softmax(jnp.zeros((2, 2)), axis=0)
        Array([[0.5, 0.5],
               [0.5, 0.5]], dtype=float32)
    """
    return jax.nn.softmax(x, _axes("softmax", axis, np.ndim(x)), where)


def log_softmax(x: jax.Array, axis: Any = -1, where: Any = None) -> jax.Array:
    """``x - logsumexp(x)`` along ``axis``: ``jax.nn.log_softmax``, checked.

    Args:
        x: the input, of any shape.
        axis: an axis of ``x``, a tuple (or list) of distinct axes, or None for all of them.
        where: elements to include (as in JAX).

    Returns:
        An array of the shape of ``x``.

    Raises:
        LayerConfigError: if ``axis`` is none of those.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.log_softmax(jnp.zeros(2))
        Array([-0.6931472, -0.6931472], dtype=float32)
    """
    return jax.nn.log_softmax(x, _axes("log_softmax", axis, np.ndim(x)), where)


def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """Gaussian error linear unit: ``jax.nn.gelu``, with ``approximate`` checked.

    ``approximate=True`` (the default, unlike PyTorch) is the tanh form; ``False`` the exact
    (erf) form of PyTorch's default.

    Args:
        x: the input, of any shape.
        approximate: True for the tanh approximation, False for the exact form.

    Returns:
        An array of the shape of ``x``.

    Raises:
        LayerConfigError: if ``approximate`` is not a bool.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> mx.gelu(jnp.array([0.0, 10.0]), approximate=False)
        Array([ 0., 10.], dtype=float32)
    """
    if not isinstance(approximate, bool):  # the label walks the stack: error path only
        approximate = bool_argument(function_label("gelu"), "approximate", approximate)
    return jax.nn.gelu(x, approximate)


def _coefficient(name: str, argument: str, value: Any, x: Any) -> Any:
    """A slope or alpha: a finite real number as a Python float (weakly typed, so it keeps
    the dtype of ``x``), or a real array that broadcasts to ``x`` without growing it (its
    leading axes added here, so that no rank promotion is asked of the user's settings)."""
    if not isinstance(value, (jax.Array, np.ndarray)):
        return check_number(
            name,
            argument,
            value,
            fix=f"Pass e.g. {argument}={0.01 if argument == 'negative_slope' else 1.0}.",
        )
    shape, dtype = np.shape(x), value.dtype
    real = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    try:
        fits = np.broadcast_shapes(value.shape, shape) == shape
    except ValueError:
        fits = False
    if not real or not fits:
        raise errors.LayerConfigError(
            f"{function_label(name)}: `{argument}` must be a number, or a real array that "
            f"broadcasts to the input's shape {shape}; got an array of dtype {dtype} and shape "
            f"{value.shape}. Pass a float, or one value per element or channel."
        )
    if value.ndim < len(shape):
        value = value.reshape((1,) * (len(shape) - value.ndim) + value.shape)
    return value


def _is(value: Any, default: float) -> bool:
    """Whether a checked coefficient is JAX's default (a Python float, not an array)."""
    return isinstance(value, float) and value == default


def _axis(name: str, value: Any, ndim: int) -> int:
    """An axis of an ``ndim``-d input, as an int in ``[-ndim, ndim)``."""
    try:
        axis = -ndim - 1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        axis = -ndim - 1
    if not -ndim <= axis < ndim:
        raise errors.LayerConfigError(
            f"{function_label(name)}: `axis` must be an int in [{-ndim}, {ndim}), an axis of "
            f"the {ndim}-d input, got {value!r:.60}. Pass e.g. axis=-1 for the last axis."
        )
    return axis


def _axes(name: str, value: Any, ndim: int) -> int | tuple[int, ...] | None:
    """None, one axis, or a tuple of distinct axes (a list becomes a tuple: JAX hashes it)."""
    if value is None:
        return None
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return _axis(name, value, ndim)
    axes = tuple(_axis(name, a, ndim) for a in value)
    if len({a % ndim for a in axes}) != len(axes):
        raise errors.LayerConfigError(
            f"{function_label(name)}: `axis` names an axis twice, got {value!r:.60}. Pass each "
            f"axis of the input once."
        )
    return axes
