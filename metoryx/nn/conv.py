"""Conv and ConvTranspose: N-dimensional convolutions over channels-last inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter
from metoryx._docstrings import fill_docstring
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, transposed
from metoryx.nn._arguments import (
    PaddingLike,
    check_divisor,
    check_window_fits,
    non_negative_ints,
    parse_padding,
    positive_int,
    window_sizes,
)
from metoryx.nn._compute import (
    DEFAULT_KERNEL_INIT,
    add_bias,
    cast,
    compute_dtype,
    conv_dimension_numbers,
    layer_dtype,
    one_batch_axis,
)

# The arguments Conv and ConvTranspose document alike (see fill_docstring).
_SIZES_DOC = """
in_size: number of input channels (the last axis of the input).
out_size: number of output channels (the last axis of the output).
kernel_size: window size per spatial axis; an int means one spatial axis.
"""
_PARAMETERS_DOC = """
use_bias: whether to add a learned bias.
kernel_init: initializer of the kernel, of shape ``(*kernel_size, in_size // groups, out_size)``.
bias_init: initializer of the bias, of shape ``(out_size,)``.
dtype: the computation dtype (None: inferred from inputs and parameters).
param_dtype: the storage dtype of the parameters.
"""


class _Convolution(Module):
    """What Conv and ConvTranspose share: the checked sizes and window arguments, the kernel
    ``(*kernel_size, in_size // groups, out_size)`` (one layout for both) and the bias."""

    def _check_window(
        self,
        in_size: Any,
        out_size: Any,
        kernel_size: Any,
        strides: Any,
        padding: Any,
        dilation: Any,
        groups: Any,
    ) -> None:
        name = type(self).__name__
        self.in_size = positive_int(name, "in_size", in_size)
        self.out_size = positive_int(name, "out_size", out_size)
        self.kernel_size = window_sizes(name, "kernel_size", kernel_size, None)
        ndim = len(self.kernel_size)
        self.strides = window_sizes(name, "strides", strides, ndim)
        self.padding = parse_padding(name, padding, ndim)
        self.dilation = window_sizes(name, "dilation", dilation, ndim)
        sizes = {"in_size": self.in_size, "out_size": self.out_size}
        self.groups = check_divisor(name, "groups", groups, **sizes)

    def _add_parameters(
        self,
        use_bias: bool,
        kernel_init: Initializer,
        bias_init: Initializer,
        dtype: Any,
        param_dtype: Any,
    ) -> None:
        self.use_bias = bool_argument(type(self).__name__, "use_bias", use_bias)
        self.dtype = layer_dtype(type(self).__name__, dtype)
        kernel_shape = (*self.kernel_size, self.in_size // self.groups, self.out_size)
        self.kernel = Parameter(kernel_init, kernel_shape, param_dtype)
        self.bias = Parameter(bias_init, (self.out_size,), param_dtype) if use_bias else None


@fill_docstring(conv_sizes=_SIZES_DOC, conv_parameters=_PARAMETERS_DOC)
class Conv(_Convolution):
    """An N-dimensional convolution over channels-last inputs (cross-correlation, as PyTorch).

    The number of spatial axes is ``len(kernel_size)``: ``kernel_size=(3, 3)`` is a 2-d
    convolution over inputs ``(*batch, height, width, in_size)``, and an int ``kernel_size=3``
    means a **1-d** convolution over ``(*batch, length, in_size)``.

    Args:
        {conv_sizes}
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
        {conv_parameters}

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
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self._check_window(in_size, out_size, kernel_size, strides, padding, dilation, groups)
        self._add_parameters(use_bias, kernel_init, bias_init, dtype, param_dtype)

    def extra_repr(self) -> str:
        return _conv_repr(self, {"strides": 1, "padding": "SAME", "dilation": 1, "groups": 1})

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.ConvNd``: ``weight`` ``(out, in / groups, *kernel)`` has the channel
        axes first."""
        ndim = len(self.kernel_size)
        return [transposed("weight", "kernel", (*range(2, ndim + 2), 1, 0))]

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
        x = _channels_last_input(self, x)
        check_window_fits(
            lambda: module_label(self), x.shape, self.kernel_size, self.dilation, self.padding
        )
        kernel, bias = self.kernel, self.bias
        dtype = compute_dtype(self.dtype, x, kernel, bias)
        y = one_batch_axis(
            lambda x: lax.conv_general_dilated(
                x,
                cast(kernel, dtype),
                window_strides=self.strides,
                padding=self.padding,
                rhs_dilation=self.dilation,
                dimension_numbers=conv_dimension_numbers(len(self.kernel_size)),
                feature_group_count=self.groups,
            ),
            cast(x, dtype),
            len(self.kernel_size),
        )
        return y if bias is None else add_bias(y, cast(bias, dtype))


@fill_docstring(conv_sizes=_SIZES_DOC, conv_parameters=_PARAMETERS_DOC)
class ConvTranspose(_Convolution):
    """An N-dimensional transposed convolution over channels-last inputs, as PyTorch's
    ``ConvTranspose1d/2d/3d``.

    The gradient of :class:`Conv` with respect to its input: each input position ``i``
    scatters ``x[i] * kernel[j]`` to output position ``i * strides + j * dilation - low``,
    ``low`` being what ``padding`` crops at the low end. With an int ``padding`` (PyTorch's),
    along each spatial axis the output has size::

        (size - 1) * strides - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1

    ``padding`` says what to crop from the ends of the full output: an int ``p`` crops ``p``
    positions from both ends, a ``(low, high)`` pair ``low`` and ``high``, and then
    ``ConvTranspose(..., padding=P)`` is the transpose of ``Conv(..., padding=P)`` with the
    same strides and dilation. ``"SAME"`` and ``"VALID"`` mean what they mean to
    ``jax.lax.conv_transpose`` and Flax's ``ConvTranspose``: ``"SAME"`` leaves
    ``size * strides`` positions, ``"VALID"`` crops nothing (and where the stride exceeds the
    kernel's extent ``dilation * (kernel_size - 1) + 1``, adds zeros at the high end up to
    ``size * strides``). ``output_padding`` adds positions at the high end only: when
    ``strides > 1``, several input sizes of a :class:`Conv` give the same output size, and
    ``output_padding`` picks which of them the transposed convolution returns to.
    ``kernel_size=4, strides=2, padding=1`` doubles the size, as ``padding="SAME"`` does with
    ``strides=2`` and any kernel size.

    Flax's ``ConvTranspose`` does not flip its kernel unless ``transpose_kernel=True``; this
    layer does, as PyTorch: for ``groups=1`` it computes ``jax.lax.conv_transpose(x,
    jnp.swapaxes(kernel, -1, -2), strides, padding, rhs_dilation=dilation,
    transpose_kernel=True)``, and a kernel ``k`` of Flax's default is ours as
    ``jnp.flip(k, range(ndim))``.

    **Kernel layout.** ``params["kernel"]`` has shape
    ``(*kernel_size, in_size // groups, out_size)``, the same layout as :class:`Conv` (output
    channel ``c`` of group ``g = c // (out_size // groups)`` reads input channels
    ``g * in_size // groups`` onwards), not flipped. PyTorch's weight ``w`` of shape
    ``(in_size, out_size // groups, *kernel_size)`` becomes ours as::

        w.reshape(groups, in_size // groups, out_size // groups, *kernel_size)
         .permute(*range(3, 3 + ndim), 1, 0, 2)
         .reshape(*kernel_size, in_size // groups, out_size)

    (with ``groups=1``: ``w.permute(*range(2, 2 + ndim), 0, 1)``). The default initializer
    is LeCun normal over that layout, ``fan_in = prod(kernel_size) * in_size // groups``.

    Args:
        {conv_sizes}
        strides: step per spatial axis in the output, an int for all of them.
        padding: what to crop from the ends of each spatial axis of the full output (see
            above): ``"SAME"``, ``"VALID"``, an int ``p`` (``p`` from both ends of every
            spatial axis, PyTorch's ``padding=p``), one int per spatial axis, or one
            ``(low, high)`` pair per spatial axis.
        dilation: kernel dilation per spatial axis, an int for all of them.
        output_padding: positions added at the high end of each spatial axis of the output,
            an int or one per spatial axis; each must be smaller than that axis's stride or
            its dilation (PyTorch's rule).
        groups: number of channel groups; each group of ``in_size // groups`` input channels
            makes its own ``out_size // groups`` output channels. Must divide both sizes.
        {conv_parameters}

    Raises:
        LayerConfigError: if a size is not a positive int, a per-axis argument has the wrong
            length, the padding is malformed or negative, an ``output_padding`` is not
            smaller than its stride or dilation, or ``groups`` does not divide both sizes.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> up = mx.ConvTranspose(8, 3, kernel_size=(4, 4), strides=2, padding=1)
        >>> init_fn, apply_fn = mx.transform(up)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["kernel"].shape
        (4, 4, 8, 3)
        >>> y, _ = apply_fn(variables, None, jnp.ones((2, 16, 16, 8)))
        >>> y.shape
        (2, 32, 32, 3)
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = 0,
        dilation: int | Sequence[int] = 1,
        output_padding: int | Sequence[int] = 0,
        groups: int = 1,
        use_bias: bool = True,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self._check_window(in_size, out_size, kernel_size, strides, padding, dilation, groups)
        name, ndim = "ConvTranspose", len(self.kernel_size)
        self.output_padding = non_negative_ints(name, "output_padding", output_padding, ndim)
        for axis, (extra, s, d) in enumerate(
            zip(self.output_padding, self.strides, self.dilation, strict=True)
        ):
            if extra >= s and extra >= d:
                raise errors.LayerConfigError(
                    f"{name}: output_padding={self.output_padding} must be smaller than either "
                    f"the stride or the dilation of each spatial axis, but axis {axis} has "
                    f"output_padding {extra}, stride {s} and dilation {d}. Use output_padding "
                    f"below {max(s, d)} there (it only picks among the sizes a stride makes)."
                )
        self._add_parameters(use_bias, kernel_init, bias_init, dtype, param_dtype)

    def extra_repr(self) -> str:
        defaults = {"strides": 1, "padding": 0, "dilation": 1, "output_padding": 0, "groups": 1}
        return _conv_repr(self, defaults)

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.ConvTransposeNd``: ``weight`` is ``(in, out / groups, *kernel)``, the
        groups splitting the input axis where ours splits the output axis."""
        ndim, groups = len(self.kernel_size), self.groups
        grouped = (groups, self.in_size // groups, self.out_size // groups)
        kernel_shape = (*self.kernel_size, grouped[1], self.out_size)
        torch_shape = (self.in_size, self.out_size // groups, *self.kernel_size)

        def to_metoryx(weight: np.ndarray) -> tuple[np.ndarray]:
            split = weight.reshape(*grouped, *self.kernel_size)
            return (split.transpose(*range(3, ndim + 3), 1, 0, 2).reshape(kernel_shape),)

        def to_torch(kernel: np.ndarray) -> tuple[np.ndarray]:
            split = kernel.reshape(*self.kernel_size, grouped[1], groups, grouped[2])
            return (split.transpose(ndim + 1, ndim, ndim + 2, *range(ndim)).reshape(torch_shape),)

        return [TorchConversion(("weight",), ("kernel",), to_metoryx, to_torch)]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the transposed convolution.

        Args:
            x: input of shape ``(*batch, *spatial, in_size)``, with ``len(kernel_size)``
                spatial axes and any number (0 or more) of leading batch axes.

        Returns:
            The output, of shape ``(*batch, *out_spatial, out_size)`` (sizes as in the class
            docs) and the computation dtype.

        Raises:
            InputShapeError: if ``x`` has too few axes, its last axis is not ``in_size``
                long, or the padding crops a spatial axis of the output to nothing.
        """
        x = _channels_last_input(self, x)
        ndim = len(self.kernel_size)
        # A convolution of the input dilated by the strides, with the kernel flipped, padded
        # so that every position a kernel tap reaches is kept, less what `padding` crops.
        pads = []
        for axis, (size, k, s, d, (low, high), extra) in enumerate(
            zip(
                x.shape[x.ndim - ndim - 1 : -1],
                self.kernel_size,
                self.strides,
                self.dilation,
                _transpose_crops(self),
                self.output_padding,
                strict=True,
            )
        ):
            full = d * (k - 1)
            uncropped = (size - 1) * s + full + extra + 1
            if uncropped - low - high < 1:
                raise errors.InputShapeError(
                    f"{module_label(self)}: spatial axis {axis} of the input (shape {x.shape}) "
                    f"has size {size}, which gives an output of size {uncropped - low - high}: "
                    f"padding {(low, high)} crops more than the {uncropped} positions there. "
                    f"Give a larger input, or build the layer with a smaller padding."
                )
            pads.append((full - low, full - high + extra))
        kernel, bias = self.kernel, self.bias
        dtype = compute_dtype(self.dtype, x, kernel, bias)
        flipped = lax.rev(cast(kernel, dtype), tuple(range(ndim)))
        y = one_batch_axis(
            lambda x: lax.conv_general_dilated(
                x,
                flipped,
                window_strides=(1,) * ndim,
                padding=pads,
                lhs_dilation=self.strides,
                rhs_dilation=self.dilation,
                dimension_numbers=conv_dimension_numbers(ndim),
                feature_group_count=self.groups,
            ),
            cast(x, dtype),
            ndim,
        )
        return y if bias is None else add_bias(y, cast(bias, dtype))


def _channels_last_input(layer: _Convolution, x: Any) -> jax.Array:
    """``x`` as an array, checked to be ``(*batch, *spatial, in_size)`` for ``layer``."""
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    ndim = len(layer.kernel_size)
    if x.ndim < ndim + 1 or x.shape[-1] != layer.in_size:
        raise errors.InputShapeError(
            f"{module_label(layer)}: expected an input of shape (*batch, "
            f"{', '.join(f's{i}' for i in range(1, ndim + 1))}, {layer.in_size}) with "
            f"{ndim} spatial axes (len(kernel_size)={ndim}) and in_size={layer.in_size} "
            f"channels last, got shape "
            f"{x.shape}. Put channels on the last axis (e.g. x.transpose(0, 2, 3, 1) for a "
            f"PyTorch NCHW image), or build the layer with the right in_size/kernel_size."
        )
    return x


def _transpose_crops(layer: ConvTranspose) -> list[tuple[int, int]]:
    """What ``layer.padding`` crops from the low and the high end of each spatial axis of the
    full transposed convolution (a negative crop adds zeros there).

    ``"SAME"`` and ``"VALID"`` are ``jax.lax.conv_transpose``'s: with the dilated kernel
    extent ``e = dilation * (kernel_size - 1) + 1``, ``"SAME"`` crops ``e - strides``
    (the larger half at the high end) to leave ``size * strides`` positions, and ``"VALID"``
    crops nothing, but pads the high end with ``strides - e`` zeros when the stride is longer
    than the kernel, to leave ``size * strides`` positions there too.
    """
    if not isinstance(layer.padding, str):
        return list(layer.padding)
    crops = []
    for k, s, d in zip(layer.kernel_size, layer.strides, layer.dilation, strict=True):
        excess = d * (k - 1) + 1 - s  # the kernel's extent beyond one stride
        if layer.padding == "SAME":
            low = max(excess // 2, 0)
            crops.append((low, excess - low))
        else:
            crops.append((0, min(excess, 0)))
    return crops


def _conv_repr(layer: _Convolution, defaults: dict[str, Any]) -> str:
    """Sizes, then each setting that differs from its default, then ``use_bias=False``."""
    config = [
        f"in_size={layer.in_size}",
        f"out_size={layer.out_size}",
        f"kernel_size={layer.kernel_size}",
    ]
    for name, default in defaults.items():
        value = getattr(layer, name)
        ndim = len(layer.kernel_size)
        if value not in (default, (default,) * ndim, ((default, default),) * ndim):
            config.append(f"{name}={value!r}")
    if not layer.use_bias:
        config.append("use_bias=False")
    return ", ".join(config)
