"""Conv: N-dimensional convolution over channels-last inputs, and the window-argument rules
that pooling shares."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Initializer, Parameter
from metoryx.nn.linear import (
    _DEFAULT_KERNEL_INIT,
    _add_bias,
    _cast,
    _compute_dtype,
    _positive_int,
)

#: ``"SAME"``, ``"VALID"``, one int for every side, one int per spatial axis, or one
#: ``(low, high)`` pair per spatial axis.
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

_PADDING_HELP = (
    '"SAME", "VALID", an int p (p on both sides of every spatial axis), one int per spatial '
    "axis, or one (low, high) pair per spatial axis"
)


def _window_sizes(layer: str, name: str, value: Any, ndim: int | None) -> tuple[int, ...]:
    """An int or a sequence of positive ints as an ``ndim``-tuple (an int means one axis when
    ``ndim`` is None, i.e. when ``value`` is the kernel size that fixes the dimensionality)."""
    if isinstance(value, int) and not isinstance(value, bool):
        sizes: tuple[Any, ...] = (value,) * (1 if ndim is None else ndim)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        sizes = tuple(value)
    else:
        sizes = (value,)
    if ndim is not None and len(sizes) != ndim:
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be an int or {ndim} ints (one per spatial axis of the "
            f"{ndim}-d kernel_size), got {value!r}."
        )
    if not sizes:
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must name at least one spatial axis, got {value!r}. Use e.g. "
            f"{name}=(3, 3) for a 2-d window."
        )
    return tuple(_positive_int(layer, name, size) for size in sizes)


def _padding(layer: str, value: Any, ndim: int) -> str | tuple[tuple[int, int], ...]:
    """``"SAME"``/``"VALID"`` or one ``(low, high)`` pair of non-negative ints per axis."""
    if isinstance(value, str) and value.upper() in ("SAME", "VALID"):
        return value.upper()
    try:
        if isinstance(value, Sequence):
            pads = tuple(_pad_pair(p) for p in value)
        else:
            pads = (_pad_pair(value),) * ndim
    except TypeError:
        pads = ()
    if len(pads) != ndim or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise errors.LayerConfigError(
            f"{layer}: `padding` must be {_PADDING_HELP}, for {ndim} spatial axes and with "
            f"non-negative sizes; got {value!r}."
        )
    return pads


def _pad_pair(value: Any) -> tuple[int, ...]:
    """``p`` as ``(p, p)``, a pair as itself; TypeError for anything but ints."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_strict_index(v) for v in value)
    return (_strict_index(value),) * 2


def _strict_index(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    return operator.index(value)


def _check_window_fits(
    label: Callable[[], str],
    x_shape: tuple[int, ...],
    window: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
) -> None:
    """Raises an InputShapeError if a spatial axis, padded, is shorter than the window.

    ``label()`` names the layer in the message; it is called on the error path only.
    """
    if padding == "SAME":
        return
    spatial = x_shape[len(x_shape) - len(window) - 1 : -1]
    pads = ((0, 0),) * len(window) if padding == "VALID" else padding
    for axis, (size, k, d, (lo, hi)) in enumerate(
        zip(spatial, window, dilation, pads, strict=True)
    ):
        extent = (k - 1) * d + 1
        if size + lo + hi < extent:
            raise errors.InputShapeError(
                f"{label()}: spatial axis {axis} of the input (shape {x_shape}) has size {size}, "
                f"{size + lo + hi} with padding {(lo, hi)}, shorter than the window's extent "
                f"{extent}. Give a larger input, a smaller window, or more padding "
                f'(padding="SAME" always fits).'
            )


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
        self.in_size = _positive_int("Conv", "in_size", in_size)
        self.out_size = _positive_int("Conv", "out_size", out_size)
        self.kernel_size = _window_sizes("Conv", "kernel_size", kernel_size, None)
        ndim = len(self.kernel_size)
        self.strides = _window_sizes("Conv", "strides", strides, ndim)
        self.padding = _padding("Conv", padding, ndim)
        self.dilation = _window_sizes("Conv", "dilation", dilation, ndim)
        self.groups = _positive_int("Conv", "groups", groups)
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
        _check_window_fits(
            lambda: module_label(self), shape, self.kernel_size, self.dilation, self.padding
        )
        dtype = _compute_dtype(self.dtype, x, self.kernel, self.bias)
        # lax takes exactly one batch axis: flatten several, add one if there is none.
        batch = shape[: len(shape) - ndim - 1]
        if len(batch) != 1:
            x = jnp.reshape(x, (math.prod(batch), *shape[len(batch) :]))
        y = lax.conv_general_dilated(
            _cast(x, dtype),
            _cast(self.kernel, dtype),
            window_strides=self.strides,
            padding=self.padding,
            rhs_dilation=self.dilation,
            dimension_numbers=_dimension_numbers(ndim),
            feature_group_count=self.groups,
        )
        if len(batch) != 1:
            y = jnp.reshape(y, (*batch, *y.shape[1:]))
        return y if self.bias is None else _add_bias(y, _cast(self.bias, dtype))
