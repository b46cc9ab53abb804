"""Pooling over channels-last inputs: max_pool, min_pool, avg_pool, global_avg_pool and
adaptive_avg_pool.

The first three slide a window over the spatial axes of an input ``(*batch, *spatial,
channels)`` (``len(kernel_size)`` spatial axes, any number of leading batch axes) with
``jax.lax.reduce_window``, and take ``kernel_size``, ``strides`` and ``padding`` like
:class:`metoryx.Conv`, except that ``strides=None`` means ``strides=kernel_size``
(non-overlapping windows, as in PyTorch) and the default padding is ``"VALID"``.
``global_avg_pool`` averages the spatial axes away; ``adaptive_avg_pool`` picks the windows
that give an output of a requested size, as PyTorch's ``AdaptiveAvgPool1d/2d/3d``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors
from metoryx._core.arguments import bool_argument
from metoryx._core.module import function_label
from metoryx._docstrings import fill_docstring
from metoryx.nn._arguments import (
    PaddingLike,
    check_window_fits,
    parse_padding,
    positive_int,
    window_sizes,
)
from metoryx.nn._compute import differentiated_as

# The arguments and errors that max_pool, min_pool and avg_pool share (see fill_docstring).
_WINDOW_ARGS_DOC = """
x: input of shape ``(*batch, *spatial, channels)`` with ``len(kernel_size)`` spatial axes.
kernel_size: window size per spatial axis; an int means one spatial axis.
strides: step per spatial axis, an int for all of them; None means ``kernel_size``.
padding: ``"VALID"``, ``"SAME"``, an int, one int per spatial axis, or one ``(low, high)``
    pair per spatial axis, as in :class:`metoryx.Conv`.
"""
_WINDOW_RAISES_DOC = """
Raises:
    LayerConfigError: if ``kernel_size``, ``strides`` or ``padding`` is malformed.
    InputShapeError: if ``x`` has too few axes or a padded spatial axis is shorter than the
        window.
"""


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
        self.spatial = _spatial_shape(
            name,
            shape,
            ndim,
            f"len(kernel_size)={ndim}",
            "pass a kernel_size with one entry per spatial axis",
        )
        if isinstance(padding, str):
            padding = tuple(
                lax.padtype_to_pads(self.spatial, self.kernel_size, self.strides, padding)
            )
        self.padding = padding
        check_window_fits(
            lambda: function_label(name), shape, self.kernel_size, (1,) * ndim, padding
        )
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


@fill_docstring(window_args=_WINDOW_ARGS_DOC, window_raises=_WINDOW_RAISES_DOC)
def max_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> jax.Array:
    """The maximum over each window (padding never wins: it counts as ``-inf``).

    Args:
        {window_args}

    Returns:
        The pooled array ``(*batch, *out_spatial, channels)``, of the dtype of ``x``.

    {window_raises}

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


@fill_docstring(window_args=_WINDOW_ARGS_DOC, window_raises=_WINDOW_RAISES_DOC)
def min_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> jax.Array:
    """The minimum over each window (padding never wins: it counts as ``+inf``).

    Args:
        {window_args}

    Returns:
        The pooled array ``(*batch, *out_spatial, channels)``, of the dtype of ``x``.

    {window_raises}

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> x = jnp.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0]).reshape(6, 1)
        >>> mx.min_pool(x, 3, strides=1)[:, 0]
        Array([1., 1., 1., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    window = _Window("min_pool", x.shape, kernel_size, strides, padding)
    return window.reduce(x, _highest(x.dtype), lax.min)


@fill_docstring(window_args=_WINDOW_ARGS_DOC, window_raises=_WINDOW_RAISES_DOC)
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
        {window_args}
        count_include_pad: whether padded zeros count in the divisor, True or False.

    Returns:
        The pooled array ``(*batch, *out_spatial, channels)``, of the (floating) dtype of
        ``x``.

    {window_raises}

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
    if not isinstance(count_include_pad, bool):  # the label walks the stack: error path only
        count_include_pad = bool_argument(
            function_label("avg_pool"), "count_include_pad", count_include_pad
        )
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    summed = window.reduce(x, np.zeros((), x.dtype), lax.add)
    if count_include_pad:
        return summed / math.prod(window.kernel_size)
    return summed / window.counts().astype(x.dtype)


def global_avg_pool(x: jax.Array, num_spatial_axes: int, keepdims: bool = False) -> jax.Array:
    """The mean over all spatial axes of ``x``: one value per example and channel.

    The number of spatial axes must be given because the input may have any number of leading
    batch axes: ``(2, 5, 7, 3)`` is two 5x7 images (``num_spatial_axes=2``) as well as a
    ``(2, 5)`` batch of 7-long sequences (``num_spatial_axes=1``). Equal to
    ``adaptive_avg_pool(x, (1,) * num_spatial_axes)`` with ``keepdims=True`` (PyTorch's
    ``AdaptiveAvgPool2d(1)``), and to ``x.mean(axis=(-3, -2))`` for 2 spatial axes. Integer
    inputs are averaged in the default floating dtype.

    Args:
        x: input of shape ``(*batch, *spatial, channels)`` with ``num_spatial_axes`` spatial
            axes.
        num_spatial_axes: how many axes before the channel axis to average over.
        keepdims: whether to keep the spatial axes, with size 1.

    Returns:
        The means, of shape ``(*batch, channels)`` (``(*batch, 1, ..., 1, channels)`` with
        ``keepdims``), of the (floating) dtype of ``x``.

    Raises:
        LayerConfigError: if ``num_spatial_axes`` is not a positive int or ``keepdims`` not a
            bool.
        InputShapeError: if ``x`` has fewer than ``num_spatial_axes + 1`` axes.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> x = jnp.arange(24.0).reshape(2, 2, 3, 2)  # two 2x3 images with 2 channels
        >>> mx.global_avg_pool(x, 2)
        Array([[ 5.,  6.],
               [17., 18.]], dtype=float32)
        >>> mx.global_avg_pool(x, 2, keepdims=True).shape
        (2, 1, 1, 2)
    """
    name = "global_avg_pool"
    if not isinstance(keepdims, bool):  # the label walks the stack: error path only
        keepdims = bool_argument(function_label(name), "keepdims", keepdims)
    num_spatial_axes = positive_int(
        name,
        "num_spatial_axes",
        num_spatial_axes,
        "It is the number of axes between the batch axes and the channel axis: pass e.g. "
        "num_spatial_axes=2 for images of shape (*batch, height, width, channels).",
    )
    x = jnp.asarray(x)
    _spatial_shape(
        name,
        x.shape,
        num_spatial_axes,
        f"num_spatial_axes={num_spatial_axes}",
        "pass num_spatial_axes equal to the number of spatial axes",
    )
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    axes = tuple(range(x.ndim - num_spatial_axes - 1, x.ndim - 1))
    return jnp.mean(x, axis=axes, keepdims=keepdims)


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    """The mean over windows chosen so that the output has the spatial size ``output_size``.

    Exactly PyTorch's ``AdaptiveAvgPool1d/2d/3d``: along a spatial axis of size ``n``, output
    cell ``i`` of ``m`` averages the inputs ``floor(i * n / m) <= j < ceil((i + 1) * n / m)``.
    The windows may overlap by one element when ``m`` does not divide ``n``, and ``m`` may
    exceed ``n`` (inputs are repeated). Integer inputs are averaged in the default floating
    dtype.

    The windows are fixed by the shapes, so the work is planned once, at trace time: axes that
    ``m`` divides are pooled with equal windows in one ``lax.reduce_window`` sum (the program
    of :func:`metoryx.avg_pool` when every axis divides), and the other axes together by one
    contraction with a constant ``(m, n)`` matrix of zeros and ones per axis (exact at the
    highest matmul precision); one division by the window sizes ends it. Differentiated (up
    to 32 windows an axis), the sums are those of a slice and a sum per output index, axis
    after axis, whose derivative is the fastest; no step of either program is per output cell.

    Args:
        x: input of shape ``(*batch, *spatial, channels)`` with ``len(output_size)`` spatial
            axes.
        output_size: the spatial size of the output, one positive int per spatial axis; an
            int means one spatial axis.

    Returns:
        The pooled array ``(*batch, *output_size, channels)``, of the (floating) dtype of
        ``x``.

    Raises:
        LayerConfigError: if ``output_size`` is not one or more positive ints.
        InputShapeError: if ``x`` has too few axes or an empty spatial axis.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> x = jnp.arange(5.0).reshape(5, 1)  # a 5-long sequence, 1 channel
        >>> mx.adaptive_avg_pool(x, 3)[:, 0]  # windows [0, 2), [1, 4), [3, 5)
        Array([0.5, 2. , 3.5], dtype=float32)
        >>> mx.adaptive_avg_pool(jnp.ones((8, 6, 6, 3)), (2, 4)).shape
        (8, 2, 4, 3)
    """
    name = "adaptive_avg_pool"
    out_sizes = window_sizes(name, "output_size", output_size, None)
    x = jnp.asarray(x)
    ndim = len(out_sizes)
    spatial = _spatial_shape(
        name,
        x.shape,
        ndim,
        f"len(output_size)={ndim}",
        "pass an output_size with one entry per spatial axis",
    )
    if 0 in spatial:
        raise errors.InputShapeError(
            f"{function_label(name)}: spatial axis {spatial.index(0)} of the input (shape "
            f"{x.shape}) is empty, so its windows would average nothing. Give an input with at "
            f"least one element along every spatial axis."
        )
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    first = x.ndim - ndim - 1
    kernel = tuple(n // m if n % m == 0 else 1 for n, m in zip(spatial, out_sizes, strict=True))
    if math.prod(kernel) > 1:
        window = (1,) * first + kernel + (1,)
        x = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, window, window, "VALID")
    counts = np.ones((), np.int64)  # the window size of each output cell
    uneven = {}  # axis of x -> its size n and the bounds of its m windows
    for axis, (n, m, k) in enumerate(zip(spatial, out_sizes, kernel, strict=True)):
        if n % m == 0:
            counts = np.multiply.outer(counts, np.full(m, k))
            continue
        start = np.arange(m) * n // m
        end = -(-np.arange(1, m + 1) * n // m)
        uneven[first + axis] = n, start, end
        counts = np.multiply.outer(counts, end - start)
    if uneven:
        sums = functools.partial(_contracted_sums, uneven=uneven)
        if max(len(start) for _, start, _ in uneven.values()) <= MAX_SLICED_WINDOWS:
            sums = differentiated_as(sums, functools.partial(_sliced_sums, uneven=uneven))
        x = sums(x)
    if counts.min() == counts.max():
        return x if counts.max() == 1 else x / int(counts.max())
    return x / counts.reshape((1,) * first + counts.shape + (1,)).astype(x.dtype)


def _contracted_sums(x: jax.Array, uneven: dict[int, tuple[int, Any, Any]]) -> jax.Array:
    """The window sums along the ``uneven`` axes in one contraction with their membership
    matrices of zeros and ones (exact at the highest matmul precision): on XLA:CPU the fastest
    forward pass, 0.8x the time of a slice and sum per window at 32 -> 5 by 5."""
    letters = [chr(ord("a") + i) for i in range(x.ndim + len(uneven))]
    out = letters[: x.ndim]
    matrices = []
    for i, (axis, (n, start, end)) in enumerate(uneven.items()):
        member = (np.arange(n) >= start[:, None]) & (np.arange(n) < end[:, None])
        out[axis] = letters[x.ndim + i]
        matrices.append((out[axis] + letters[axis], np.asarray(member, x.dtype)))
    spec = ",".join(["".join(letters[: x.ndim])] + [s for s, _ in matrices]) + "->" + "".join(out)
    return jnp.einsum(spec, x, *(m for _, m in matrices), precision=lax.Precision.HIGHEST)


def _sliced_sums(x: jax.Array, uneven: dict[int, tuple[int, Any, Any]]) -> jax.Array:
    """The same sums axis by axis, a slice and a sum per output index: the derivative
    ``adaptive_avg_pool`` differentiates (pads and additions, 0.65x the time of the
    contraction's forward and backward at 32 -> 5 by 5)."""
    for axis, (_, start, end) in uneven.items():
        sums = [
            lax.slice_in_dim(x, a, b, axis=axis).sum(axis, keepdims=True)
            for a, b in zip(start.tolist(), end.tolist(), strict=True)
        ]
        x = lax.concatenate(sums, axis)
    return x


# Up to this output size along every axis that it does not divide, adaptive_avg_pool's
# derivative is that of a slice and a sum per output index (on CPU ~1.5x faster forward and
# backward than the contraction's at 32 -> 5); above, the contraction's, so that the program
# does not grow with the size.
MAX_SLICED_WINDOWS = 32


def _spatial_shape(
    name: str, shape: tuple[int, ...], ndim: int, given: str, fix: str
) -> tuple[int, ...]:
    """The ``ndim`` spatial sizes of an input ``(*batch, *spatial, channels)``, or an
    InputShapeError that says where ``ndim`` came from (``given``) and how to fix it."""
    if len(shape) < ndim + 1:
        axes = ", ".join(f"s{i}" for i in range(1, ndim + 1)) if ndim <= 4 else f"s1, ..., s{ndim}"
        raise errors.InputShapeError(
            f"{function_label(name)}: expected an input of shape (*batch, {axes}, channels) with "
            f"{ndim} spatial axes ({given}) and channels last, got shape {shape}. Add the "
            f"channel axis (x[..., None] for a single channel), or {fix}."
        )
    return shape[len(shape) - ndim - 1 : -1]


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
