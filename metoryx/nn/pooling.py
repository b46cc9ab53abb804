"""Pooling over channels-last inputs: max_pool, min_pool and avg_pool.

All three slide a window over the spatial axes of an input ``(*batch, *spatial, channels)``
(``len(kernel_size)`` spatial axes, any number of leading batch axes) with
``jax.lax.reduce_window``, and take ``kernel_size``, ``strides`` and ``padding`` like
:class:`metoryx.Conv`, except that ``strides=None`` means ``strides=kernel_size``
(non-overlapping windows, as in PyTorch) and the default padding is ``"VALID"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.module import calling_module_label
from metoryx.nn._arguments import PaddingLike, check_window_fits, parse_padding, window_sizes


class _Window:
    """A pooling window resolved against an input: per-axis sizes, strides and padding."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None,
        padding: PaddingLike,
    ):
        self.kernel_size = window_sizes(name, "kernel_size", kernel_size, None)
        ndim = len(self.kernel_size)
        self.strides = (
            self.kernel_size if strides is None else window_sizes(name, "strides", strides, ndim)
        )
        padding = parse_padding(name, padding, ndim)
        if len(shape) < ndim + 1:
            raise errors.InputShapeError(
                f"{_label(name)}: expected an input of shape "
                f"(*batch, {', '.join(f's{i}' for i in range(1, ndim + 1))}, channels) with "
                f"{ndim} spatial axes (len(kernel_size)={ndim}) and channels last, got shape "
                f"{shape}. Add the channel axis (x[..., None] for a single channel), or pass a "
                f"kernel_size with one entry per spatial axis."
            )
        self.spatial = shape[len(shape) - ndim - 1 : -1]
        if isinstance(padding, str):
            padding = tuple(
                lax.padtype_to_pads(self.spatial, self.kernel_size, self.strides, padding)
            )
        self.padding = padding
        check_window_fits(lambda: _label(name), shape, self.kernel_size, (1,) * ndim, padding)
        # Window over every axis of x: size 1 (no pooling) on the batch and channel axes.
        self.batch_ndim = len(shape) - ndim - 1
        ones = (1,) * self.batch_ndim
        self.full_kernel = (*ones, *self.kernel_size, 1)
        self.full_strides = (*ones, *self.strides, 1)
        self.full_padding = ((0, 0),) * self.batch_ndim + tuple(padding) + ((0, 0),)

    def reduce(self, x: jax.Array, init: Any, computation: Callable) -> jax.Array:
        return lax.reduce_window(
            x, init, computation, self.full_kernel, self.full_strides, self.full_padding
        )

    def counts(self) -> np.ndarray:
        """The number of input (non-padding) elements in each window, shaped to broadcast
        against the pooled output."""
        counts = np.ones((), np.int64)
        for size, k, stride, (lo, hi) in zip(
            self.spatial, self.kernel_size, self.strides, self.padding, strict=True
        ):
            starts = np.arange((size + lo + hi - k) // stride + 1) * stride - lo
            per_axis = np.minimum(starts + k, size) - np.maximum(starts, 0)
            counts = np.multiply.outer(counts, per_axis)
        return counts.reshape((1,) * self.batch_ndim + counts.shape + (1,))


def max_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> jax.Array:
    """The maximum over each window (padding never wins: it counts as ``-inf``).

    Args:
        x: input of shape ``(*batch, *spatial, channels)`` with ``len(kernel_size)`` spatial
            axes.
        kernel_size: window size per spatial axis; an int means one spatial axis.
        strides: step per spatial axis, an int for all of them; None means ``kernel_size``.
        padding: ``"VALID"``, ``"SAME"``, an int, one int per spatial axis, or one
            ``(low, high)`` pair per spatial axis, as in :class:`metoryx.Conv`.

    Returns:
        The pooled array ``(*batch, *out_spatial, channels)``, of the dtype of ``x``.

    Raises:
        LayerConfigError: if ``kernel_size``, ``strides`` or ``padding`` is malformed.
        InputShapeError: if ``x`` has too few axes or a padded spatial axis is shorter than
            the window.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
        >>> mx.max_pool(x, (2, 2))[0, :, :, 0]
        Array([[ 5.,  7.],
               [13., 15.]], dtype=float32)
    """
    x = jnp.asarray(x)
    window = _Window("max_pool", x.shape, kernel_size, strides, padding)
    return window.reduce(x, _lowest(x.dtype), lax.max)


def min_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> jax.Array:
    """The minimum over each window (padding never wins: it counts as ``+inf``).

    Args:
        x: input of shape ``(*batch, *spatial, channels)`` with ``len(kernel_size)`` spatial
            axes.
        kernel_size: window size per spatial axis; an int means one spatial axis.
        strides: step per spatial axis, an int for all of them; None means ``kernel_size``.
        padding: ``"VALID"``, ``"SAME"``, an int, one int per spatial axis, or one
            ``(low, high)`` pair per spatial axis, as in :class:`metoryx.Conv`.

    Returns:
        The pooled array ``(*batch, *out_spatial, channels)``, of the dtype of ``x``.

    Raises:
        LayerConfigError: if ``kernel_size``, ``strides`` or ``padding`` is malformed.
        InputShapeError: if ``x`` has too few axes or a padded spatial axis is shorter than
            the window.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> x = jnp.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0]).reshape(6, 1)
        >>> mx.min_pool(x, 3, strides=1)[:, 0]
        Array([1., 1., 1., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    window = _Window("min_pool", x.shape, kernel_size, strides, padding)
    return window.reduce(x, _highest(x.dtype), lax.min)


def avg_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
    count_include_pad: bool = True,
) -> jax.Array:
    """The mean over each window.

    Padding adds zeros. With ``count_include_pad=True`` (PyTorch's default) every window is
    divided by its full size ``prod(kernel_size)``, padding included; with False, by the
    number of input elements it covers, so border windows are true means of real values.
    Integer inputs are averaged in the default floating dtype.

    Args:
        x: input of shape ``(*batch, *spatial, channels)`` with ``len(kernel_size)`` spatial
            axes.
        kernel_size: window size per spatial axis; an int means one spatial axis.
        strides: step per spatial axis, an int for all of them; None means ``kernel_size``.
        padding: ``"VALID"``, ``"SAME"``, an int, one int per spatial axis, or one
            ``(low, high)`` pair per spatial axis, as in :class:`metoryx.Conv`.
        count_include_pad: whether padded zeros count in the divisor.

    Returns:
        The pooled array ``(*batch, *out_spatial, channels)``, of the (floating) dtype of
        ``x``.

    Raises:
        LayerConfigError: if ``kernel_size``, ``strides`` or ``padding`` is malformed.
        InputShapeError: if ``x`` has too few axes or a padded spatial axis is shorter than
            the window.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(4, 1)
        >>> mx.avg_pool(x, 2, strides=1, padding=1)[:, 0]
        Array([0.5, 1.5, 2.5, 3.5, 2. ], dtype=float32)
        >>> mx.avg_pool(x, 2, strides=1, padding=1, count_include_pad=False)[:, 0]
        Array([1. , 1.5, 2.5, 3.5, 4. ], dtype=float32)
    """
    x = jnp.asarray(x)
    window = _Window("avg_pool", x.shape, kernel_size, strides, padding)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    summed = window.reduce(x, np.zeros((), x.dtype), lax.add)
    if count_include_pad:
        return summed / math.prod(window.kernel_size)
    return summed / window.counts().astype(x.dtype)


def _label(name: str) -> str:
    """``"max_pool"``, or ``"max_pool in Net at 'encoder'"`` when called inside a layer."""
    caller = calling_module_label()
    return name if caller is None else f"{name} in {caller}"


def _lowest(dtype: np.dtype) -> np.ndarray:
    # NumPy scalars, not jax arrays: lax recognizes a concrete identity and emits
    # reduce_window_max/min, whose gradient is one select_and_scatter_add.
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.array(-np.inf, dtype)
    return np.array(False if dtype == np.bool_ else jnp.iinfo(dtype).min, dtype)


def _highest(dtype: np.dtype) -> np.ndarray:
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.array(np.inf, dtype)
    return np.array(True if dtype == np.bool_ else jnp.iinfo(dtype).max, dtype)
