"""Dense: the fully connected layer, and the dtype rule every layer shares."""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Initializer, Parameter

#: The default kernel initializer of Dense and Conv: ``initializers.lecun_normal()``.
_DEFAULT_KERNEL_INIT = initializers.lecun_normal()


def _compute_dtype(dtype: Any, *arrays: jax.Array | None) -> jnp.dtype:
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


def _cast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` in ``dtype``, adding no operation to the program when it already is."""
    return x if x.dtype == dtype else x.astype(dtype)


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over the last axis, as the implicit broadcast would trace it.

    ``broadcast_to_rank`` keeps this working under ``jax_numpy_rank_promotion="raise"`` with
    the same two equations (``broadcast_in_dim``, ``add``) as a hand-written ``y + bias``.
    """
    return y + lax.broadcast_to_rank(bias, y.ndim)


class Dense(Module):
    """A fully connected layer: ``y = x @ kernel + bias`` over the last axis of ``x``.

    Args:
        in_size: size of the last axis of the input.
        out_size: size of the last axis of the output.
        use_bias: whether to add a learned bias.
        kernel_init: initializer of the kernel, of shape ``(in_size, out_size)``.
        bias_init: initializer of the bias, of shape ``(out_size,)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if a size is not a positive int.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(3, 4))
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["kernel"].shape, variables["params"]["bias"].shape
        ((3, 4), (4,))
        >>> y, _ = apply_fn(variables, None, jnp.ones((2, 5, 3)))
        >>> y.shape
        (2, 5, 4)
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        use_bias: bool = True,
        kernel_init: Initializer = _DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self.in_size = _positive_int("Dense", "in_size", in_size)
        self.out_size = _positive_int("Dense", "out_size", out_size)
        self.use_bias = use_bias
        self.dtype = dtype
        self.kernel = Parameter(kernel_init, (self.in_size, self.out_size), param_dtype)
        self.bias = Parameter(bias_init, (self.out_size,), param_dtype) if use_bias else None

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, out_size={self.out_size}, use_bias={self.use_bias}"

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer.

        Args:
            x: input of shape ``(*batch, in_size)``, any number of leading batch axes.

        Returns:
            The output, of shape ``(*batch, out_size)`` and the computation dtype.

        Raises:
            InputShapeError: if the last axis of ``x`` is not ``in_size`` long.
        """
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_size:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape (..., {self.in_size}) whose "
                f"last axis has in_size={self.in_size} features, got shape {x.shape}. "
                f"Reshape the input so its last axis holds the features, or build the layer "
                f"with in_size equal to the input's last axis."
            )
        dtype = _compute_dtype(self.dtype, x, self.kernel, self.bias)
        y = _cast(x, dtype) @ _cast(self.kernel, dtype)
        return y if self.bias is None else _add_bias(y, _cast(self.bias, dtype))


def _positive_int(layer: str, name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer, else a ``LayerConfigError``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be a positive int, got {value!r}. Pass a size such as "
            f"{name}=64."
        )
    return number
