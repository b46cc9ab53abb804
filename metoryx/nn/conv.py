"""Conv: N-dimensional convolution over channels-last inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter
from metoryx.initializers import Initializer
from metoryx.nn._arguments import (
    PaddingLike,
    check_window_fits,
    parse_padding,
    positive_int,
    window_sizes,
)
from metoryx.nn._compute import add_bias, cast, compute_dtype

_DEFAULT_KERNEL_INIT = initializers.lecun_normal()


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last input and output, kernel ``(*spatial, in, out)``: XLA reads these
    layouts directly, so no transpose is traced."""
    spatial = tuple(range(1, ndim + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim + 1, *spatial),
        rhs_spec=(ndim + 1, ndim, *range(ndim)),
        out_spec=(0, ndim + 1, *spatial),
    )


class Conv(Module):
    """An N-dimensional convolution over channels-last inputs (cross-correlation, as PyTorch).

    The number of spatial axes is ``len(kernel_size)``: ``kernel_size=(3, 3)`` is a 2-d
    convolution over inputs ``(*batch, height, width, in_size)``, and an int ``kernel_size=3``
    means a **1-d** convolution over ``(*batch, length, in_size)``.

    Args:
        in_size: number of input channels (the last axis of the input).
        out_size: number of output channels (the last axis of the output).
        kernel_size: window size per spatial axis; an int means one spatial axis.
        strides: step per spatial axis, an int for all of them.
        padding: ``"SAME"`` (output size ``ceil(size / stride)``, the extra padding at the high
            end, as in TensorFlow and Flax; with stride 1 this is PyTorch's ``"same"``),
            ``"VALID"`` (no padding), an int ``p`` (``p`` on both sides of every spatial axis,
            PyTorch's ``padding=p``), one int per spatial axis, or one ``(low, high)`` pair
            per spatial axis for asymmetric padding. Padding adds zeros.
        dilation: kernel dilation per spatial axis, an int for all of them.
        groups: number of channel groups; each group of ``in_size // groups`` input channels
            is convolved with its own ``out_size // groups`` filters. ``groups=in_size`` is a
            depthwise convolution. Must divide both ``in_size`` and ``out_size``.
        use_bias: whether to add a learned bias.
        kernel_init: initializer of the kernel, of shape
            ``(*kernel_size, in_size // groups, out_size)``.
        bias_init: initializer of the bias, of shape ``(out_size,)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if a size is not a positive int, a per-axis argument has the wrong
            length, the padding is malformed, or ``groups`` does not divide both sizes.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> conv = mx.Conv(3, 8, kernel_size=(3, 3), strides=2)
        >>> init_fn, apply_fn = mx.transform(conv)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["kernel"].shape
        (3, 3, 3, 8)
        >>> y, _ = apply_fn(variables, None, jnp.ones((4, 32, 32, 3)))
        >>> y.shape
        (4, 16, 16, 8)
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        kernel_init: Initializer = _DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self.in_size = positive_int("Conv", "in_size", in_size)
        self.out_size = positive_int("Conv", "out_size", out_size)
        self.kernel_size = window_sizes("Conv", "kernel_size", kernel_size, None)
        ndim = len(self.kernel_size)
        self.strides = window_sizes("Conv", "strides", strides, ndim)
        self.padding = parse_padding("Conv", padding, ndim)
        self.dilation = window_sizes("Conv", "dilation", dilation, ndim)
        self.groups = positive_int("Conv", "groups", groups)
        if self.in_size % self.groups or self.out_size % self.groups:
            raise errors.LayerConfigError(
                f"Conv: groups={self.groups} must divide both in_size={self.in_size} and "
                f"out_size={self.out_size}. Choose groups among the common divisors of the two "
                f"sizes (groups={math.gcd(self.in_size, self.out_size)} is the largest), or "
                f"change the sizes."
            )
        self.use_bias = use_bias
        self.dtype = dtype
        kernel_shape = (*self.kernel_size, self.in_size // self.groups, self.out_size)
        self.kernel = Parameter(kernel_init, kernel_shape, param_dtype)
        self.bias = Parameter(bias_init, (self.out_size,), param_dtype) if use_bias else None

    def extra_repr(self) -> str:
        config = [
            f"in_size={self.in_size}",
            f"out_size={self.out_size}",
            f"kernel_size={self.kernel_size}",
        ]
        defaults = {"strides": 1, "padding": "SAME", "dilation": 1, "groups": 1}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value not in (default, (default,) * len(self.kernel_size)):
                config.append(f"{name}={value!r}")
        if not self.use_bias:
            config.append("use_bias=False")
        return ", ".join(config)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the convolution.

        Args:
            x: input of shape ``(*batch, *spatial, in_size)``, with ``len(kernel_size)``
                spatial axes and any number (0 or more) of leading batch axes.

        Returns:
            The output, of shape ``(*batch, *out_spatial, out_size)`` and the computation
            dtype.

        Raises:
            InputShapeError: if ``x`` has too few axes, its last axis is not ``in_size``
                long, or a spatial axis is shorter than the (dilated) kernel.
        """
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        ndim = len(self.kernel_size)
        shape = x.shape
        if len(shape) < ndim + 1 or shape[-1] != self.in_size:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape (*batch, "
                f"{', '.join(f's{i}' for i in range(1, ndim + 1))}, {self.in_size}) with "
                f"{ndim} spatial axes (len(kernel_size)={ndim}) and in_size={self.in_size} "
                f"channels last, got shape "
                f"{shape}. Put channels on the last axis (e.g. x.transpose(0, 2, 3, 1) for a "
                f"PyTorch NCHW image), or build the layer with the right in_size/kernel_size."
            )
        check_window_fits(
            lambda: module_label(self), shape, self.kernel_size, self.dilation, self.padding
        )
        kernel, bias = self.kernel, self.bias
        dtype = compute_dtype(self.dtype, x, kernel, bias)
        # lax takes exactly one batch axis: flatten several, add one if there is none.
        batch = shape[: len(shape) - ndim - 1]
        if len(batch) != 1:
            x = jnp.reshape(x, (math.prod(batch), *shape[len(batch) :]))
        y = lax.conv_general_dilated(
            cast(x, dtype),
            cast(kernel, dtype),
            window_strides=self.strides,
            padding=self.padding,
            rhs_dilation=self.dilation,
            dimension_numbers=_dimension_numbers(ndim),
            feature_group_count=self.groups,
        )
        if len(batch) != 1:
            y = jnp.reshape(y, (*batch, *y.shape[1:]))
        return y if bias is None else add_bias(y, cast(bias, dtype))
