"""Dense: the fully connected layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter
from metoryx.initializers import Initializer
from metoryx.nn._arguments import positive_int
from metoryx.nn._compute import add_bias, cast, compute_dtype

#: The default kernel initializer of Dense and Conv: ``initializers.lecun_normal()``.
_DEFAULT_KERNEL_INIT = initializers.lecun_normal()


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
        self.in_size = positive_int("Dense", "in_size", in_size)
        self.out_size = positive_int("Dense", "out_size", out_size)
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
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_size:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape (..., {self.in_size}) whose "
                f"last axis has in_size={self.in_size} features, got shape {x.shape}. "
                f"Reshape the input so its last axis holds the features, or build the layer "
                f"with in_size equal to the input's last axis."
            )
        kernel, bias = self.kernel, self.bias
        dtype = compute_dtype(self.dtype, x, kernel, bias)
        y = cast(x, dtype) @ cast(kernel, dtype)
        return y if bias is None else add_bias(y, cast(bias, dtype))


# END
