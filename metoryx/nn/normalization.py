"""Normalization layers: BatchNorm (statistics of the batch, running averages for evaluation),
and LayerNorm, RMSNorm, GroupNorm and InstanceNorm (statistics of each example).

LayerNorm, GroupNorm and InstanceNorm differentiate with the closed-form derivative of the
normalization, which keeps only the output and the multiplier for the backward pass; in these
and RMSNorm the input gradient is materialized once per layer (an optimization barrier), so
that XLA does not recompute a deep residual network's chain of gradient additions in every
consumer: see ``_standardize``. Values and derivatives of every order are those of the
formula."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter, State
from metoryx._docstrings import fill_docstring
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, same, torch_only
from metoryx.nn._arguments import check_divisor, check_epsilon, check_number, positive_int
from metoryx.nn._compute import (
    TRAINING_DOC,
    at_least_float32,
    cast,
    compute_dtype,
    layer_dtype,
    layer_training,
    mode_repr,
)

# The arguments LayerNorm, GroupNorm and InstanceNorm document alike (see fill_docstring).
_NORM_ARGS_DOC = """
epsilon: added to the variance before the square root, ``>= 0``.
use_scale: whether to multiply by a learned ``scale`` (``params["scale"]``).
use_bias: whether to add a learned ``bias`` (``params["bias"]``).
scale_init: initializer of ``scale``, of shape ``(size,)``.
bias_init: initializer of ``bias``, of shape ``(size,)``.
dtype: the computation dtype (None: inferred from inputs and parameters).
param_dtype: the storage dtype of the parameters.
"""

# What the calls of LayerNorm and RMSNorm take, return and raise.
_LAST_AXIS_CALL_DOC = """
Args:
    x: input of shape ``(*batch, size)``, any number of leading batch axes.

Returns:
    The normalized input, of the shape of ``x`` and the computation dtype.

Raises:
    InputShapeError: if ``x`` is a scalar or its last axis is not ``size`` long.
"""


class _Normalization(Module):
    """What the normalization layers share: the checked ``size``, ``epsilon`` and ``dtype``,
    and the per-feature ``scale`` and ``bias`` of shape ``(size,)``."""

    def _check(self, size: Any, epsilon: Any, dtype: Any) -> None:
        name = type(self).__name__
        self.size = positive_int(name, "size", size)
        self.epsilon = check_epsilon(name, epsilon)
        self.dtype = layer_dtype(name, dtype)

    def _add_scale_and_bias(
        self,
        use_scale: bool,
        use_bias: bool,
        scale_init: Initializer,
        bias_init: Initializer,
        param_dtype: Any,
    ) -> None:
        name = type(self).__name__
        use_scale = bool_argument(name, "use_scale", use_scale)
        use_bias = bool_argument(name, "use_bias", use_bias)
        self.scale = Parameter(scale_init, (self.size,), param_dtype) if use_scale else None
        self.bias = Parameter(bias_init, (self.size,), param_dtype) if use_bias else None


class _AffineNorm(_Normalization):
    """The constructor of LayerNorm and InstanceNorm, which inherit it as it is."""

    def __init__(
        self,
        size: int,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = initializers.ones,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self._check(size, epsilon, dtype)
        self._add_scale_and_bias(use_scale, use_bias, scale_init, bias_init, param_dtype)


@fill_docstring(training_attribute=TRAINING_DOC)
class BatchNorm(_Normalization):
    """Batch normalization over the last axis (features), statistics over all other axes.

    In training (``is_training=True``) the input is normalized with the statistics of the
    batch, ``(x - mean) / sqrt(var + epsilon) * scale + bias``, and the running statistics are
    updated; in evaluation it is normalized with the running statistics and nothing changes.
    ``bn.training = False`` (or :func:`~metoryx.set_training`) keeps the layer in evaluation
    in every call, as PyTorch's ``bn.eval()``: the way to fine-tune with a frozen backbone,
    whose statistics then stay bit-identical while the rest of the model trains.

    ``momentum`` follows Flax: ``running = momentum * running + (1 - momentum) * batch``, so
    PyTorch's ``momentum`` is ``1 - momentum`` here (PyTorch's default 0.1 is our 0.9). As in
    PyTorch, the running variance accumulates the unbiased batch variance (divided by
    ``n - 1``) while the input is normalized with the biased one (divided by ``n``). The
    variance is computed in two passes (the mean of squared deviations from the mean), which
    stays accurate when the mean is large compared to the spread.

    With ``axis_name``, the statistics are averaged across the devices of that mapped axis
    (``jax.lax.pmean`` inside ``jax.pmap``/``shard_map`` over that axis name): the batch mean
    first, then the mean squared deviation from it, so the result is the exact statistics of
    the global batch when every device holds the same number of examples.

    Statistics and the normalization are computed in at least float32 (bfloat16 and float16
    inputs are upcast for them), then the output is cast to the computation dtype. The running
    statistics are stored in at least float32 too.

    Args:
        size: number of features (the last axis of the input).
        momentum: decay of the running statistics, in ``[0, 1]``.
        epsilon: added to the variance before the square root, ``>= 0``.
        use_scale: whether to multiply by a learned ``scale`` (``params["scale"]``).
        use_bias: whether to add a learned ``bias`` (``params["bias"]``).
        axis_name: the name of a mapped axis to average statistics across devices over, or
            None for per-device statistics.
        scale_init: initializer of ``scale``, of shape ``(size,)``.
        bias_init: initializer of ``bias``, of shape ``(size,)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if ``size`` is not a positive int, ``epsilon`` is negative or
            ``momentum`` is outside ``[0, 1]``.

    Attributes:
        {training_attribute}

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> bn = mx.BatchNorm(3, momentum=0.9)
        >>> init_fn, apply_fn = mx.transform(bn)
        >>> variables = init_fn(jax.random.key(0))
        >>> sorted(variables), sorted(variables["batch_stats"])
        (['batch_stats', 'params'], ['mean', 'var'])
        >>> x = jnp.arange(12.0).reshape(4, 3)
        >>> y, variables = apply_fn(variables, None, x, is_training=True)
        >>> y.mean(axis=0).round(4)
        Array([0., 0., 0.], dtype=float32)
        >>> variables["batch_stats"]["mean"].round(4)  # 0.9 * 0 + 0.1 * [4.5, 5.5, 6.5]
        Array([0.45, 0.55, 0.65], dtype=float32)
        >>> y, _ = apply_fn(variables, None, x, is_training=False)
        >>> bn.training = False  # evaluation in every call, e.g. in a frozen backbone
        >>> _, apply_fn = mx.transform(bn)
        >>> _, new_variables = apply_fn(variables, None, x, is_training=True)
        >>> new_variables["batch_stats"]["mean"].round(4)  # unchanged
        Array([0.45, 0.55, 0.65], dtype=float32)
    """

    training: bool | None = None

    def __init__(
        self,
        size: int,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        axis_name: Hashable | None = None,
        scale_init: Initializer = initializers.ones,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self._check(size, epsilon, dtype)
        self.momentum = check_number(
            "BatchNorm",
            "momentum",
            momentum,
            0.0,
            1.0,
            fix="It is the weight of the old running statistics (Flax's convention), so "
            "PyTorch's momentum=0.1 is momentum=0.9 here: pass 1 - PyTorch's value.",
        )
        self.axis_name = axis_name
        self._add_scale_and_bias(use_scale, use_bias, scale_init, bias_init, param_dtype)
        stats_dtype = at_least_float32(param_dtype)
        self.mean = State("batch_stats", initializers.zeros, (self.size,), stats_dtype)
        self.var = State("batch_stats", initializers.ones, (self.size,), stats_dtype)

    def extra_repr(self) -> str:
        config = f"size={self.size}, momentum={self.momentum}, epsilon={self.epsilon}"
        if self.axis_name is not None:
            config += f", axis_name={self.axis_name!r}"
        return mode_repr(self, config)

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.BatchNormNd``: ``weight`` is the scale, ``running_mean``/``running_var``
        the statistics; ``num_batches_tracked`` is not kept (written as 0: it matters to
        PyTorch only with ``momentum=None``)."""
        return [
            *_torch_scale(self),
            same("running_mean", "mean"),
            same("running_var", "var"),
            torch_only("num_batches_tracked", np.array(0, np.int64)),
        ]

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """Normalizes ``x``.

        Args:
            x: input of shape ``(..., size)``.
            is_training: True to normalize with the batch statistics and update the running
                ones, False to normalize with the running statistics. A ``training`` switch
                that is set decides instead.

        Returns:
            The normalized input, of the shape of ``x`` and the computation dtype.

        Raises:
            InputShapeError: if the last axis of ``x`` is not ``size`` long, or, in training
                without ``axis_name``, if there is only one value per feature (no variance).
        """
        x = jnp.asarray(x)
        shape = x.shape
        if not shape or shape[-1] != self.size:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape (..., {self.size}) with "
                f"size={self.size} features on the last axis, got shape {shape}. Put the "
                f"features last (e.g. x.transpose(0, 2, 3, 1) for a PyTorch NCHW image), or "
                f"build the layer with size equal to the input's last axis."
            )
        dtype = compute_dtype(self.dtype, x, self.scale, self.bias)
        stats_dtype = at_least_float32(dtype)
        x_stats = cast(x, stats_dtype)
        # Per-feature vectors take the rank of x (size-1 axes) to broadcast under
        # jax_numpy_rank_promotion="raise".
        feature_shape = (1,) * (len(shape) - 1) + (self.size,)
        if layer_training(self, is_training):
            centered, var = self._center_with_batch_statistics(x_stats, shape)
        else:
            mean = cast(self.mean, stats_dtype).reshape(feature_shape)
            var = cast(self.var, stats_dtype).reshape(feature_shape)
            centered = x_stats - mean
        multiplier = lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            multiplier = multiplier * cast(self.scale, stats_dtype).reshape(feature_shape)
        y = centered * multiplier
        if self.bias is not None:
            y = y + cast(self.bias, stats_dtype).reshape(feature_shape)
        return cast(y, dtype)

    def _center_with_batch_statistics(
        self, x: jax.Array, shape: tuple[int, ...]
    ) -> tuple[jax.Array, jax.Array]:
        """``x`` minus the batch mean, and the biased batch variance (size-1 axes but the
        last); updates the running statistics."""
        axes = tuple(range(len(shape) - 1))
        count: Any = math.prod(shape[:-1])
        if self.axis_name is None and count < 2:
            raise errors.InputShapeError(
                f"{module_label(self)}: training needs more than one value per feature to "
                f"compute a variance, got an input of shape {shape}. Use a batch of at least "
                f"2 examples, or call with is_training=False."
            )
        mean = jnp.mean(x, axis=axes, keepdims=True)
        if self.axis_name is not None:
            mean = lax.pmean(mean, self.axis_name)
        # Two passes: the mean of squared deviations, never E[x^2] - E[x]^2, which loses all
        # precision when |mean| is large compared to the spread.
        centered = x - mean
        var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
        if self.axis_name is not None:
            var = lax.pmean(var, self.axis_name)
            count = count * lax.axis_size(self.axis_name)
        m = self.momentum
        running_mean, running_var = self.mean, self.var
        batch_mean = cast(mean.reshape(self.size), running_mean.dtype)
        unbiased_var = cast((var * (count / (count - 1))).reshape(self.size), running_var.dtype)
        self.mean = m * running_mean + (1 - m) * batch_mean
        self.var = m * running_var + (1 - m) * unbiased_var
        return centered, var


@fill_docstring(norm_args=_NORM_ARGS_DOC)
class LayerNorm(_AffineNorm):
    """Layer normalization over the last axis: each position is normalized on its own.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, with the mean and the biased
    variance of the ``size`` features of each position (the last axis), as
    ``torch.nn.LayerNorm(size)``. The variance is computed in two passes (the mean of squared
    deviations from the mean). Statistics and the normalization are computed in at least
    float32, then the output is cast to the computation dtype.

    Args:
        size: number of features (the last axis of the input).
        {norm_args}

    Raises:
        LayerConfigError: if ``size`` is not a positive int or ``epsilon`` is negative.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.LayerNorm(4))
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables)
        {'params': {'bias': (4,), 'scale': (4,)}}
        >>> y, _ = apply_fn(variables, None, jnp.arange(24.0).reshape(2, 3, 4))
        >>> y[0, 0].round(4)
        Array([-1.3416, -0.4472,  0.4472,  1.3416], dtype=float32)
    """

    def extra_repr(self) -> str:
        return _affine_repr(self, f"size={self.size}, epsilon={self.epsilon}")

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.LayerNorm``: ``weight`` is the scale."""
        return _torch_scale(self)

    @fill_docstring(last_axis_call=_LAST_AXIS_CALL_DOC)
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` over its last axis.

        {last_axis_call}
        """
        x = _checked_input(self, x, 1, "(..., {size})", _FEATURES_LAST)
        dtype = compute_dtype(self.dtype, x, self.scale, self.bias)
        y = _standardize(cast(x, at_least_float32(dtype)), (x.ndim - 1,), None, self.epsilon)
        return _scale_and_shift(y, self.scale, self.bias, dtype)


class RMSNorm(_Normalization):
    """Root-mean-square normalization over the last axis, with no centering.

    ``y = x / sqrt(mean(x ** 2) + epsilon) * scale``, the mean over the ``size`` features of
    each position (the last axis), as ``torch.nn.RMSNorm(size, eps=epsilon)``. The mean square
    is computed in at least float32, then the output is cast to the computation dtype.

    Args:
        size: number of features (the last axis of the input).
        epsilon: added to the mean square before the square root, ``>= 0``.
        use_scale: whether to multiply by a learned ``scale`` (``params["scale"]``).
        scale_init: initializer of ``scale``, of shape ``(size,)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if ``size`` is not a positive int or ``epsilon`` is negative.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.RMSNorm(2, epsilon=0.0))
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables)
        {'params': {'scale': (2,)}}
        >>> y, _ = apply_fn(variables, None, jnp.array([[1.0, 7.0]]))
        >>> [round(float(v), 4) for v in y[0]]  # divided by sqrt((1 + 49) / 2)
        [0.2, 1.4]
    """

    def __init__(
        self,
        size: int,
        epsilon: float = 1e-6,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self._check(size, epsilon, dtype)
        use_scale = bool_argument("RMSNorm", "use_scale", use_scale)
        self.scale = Parameter(scale_init, (self.size,), param_dtype) if use_scale else None

    def extra_repr(self) -> str:
        config = f"size={self.size}, epsilon={self.epsilon}"
        return config if self.scale is not None else config + ", use_scale=False"

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.RMSNorm``: ``weight`` is the scale."""
        return _torch_scale(self)

    @fill_docstring(last_axis_call=_LAST_AXIS_CALL_DOC)
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` over its last axis.

        {last_axis_call}
        """
        x = _checked_input(self, x, 1, "(..., {size})", _FEATURES_LAST)
        dtype = compute_dtype(self.dtype, x, self.scale)
        x = cast(x, at_least_float32(dtype))
        y = _standardize(x, (x.ndim - 1,), None, self.epsilon, center=False)
        return _scale_and_shift(y, self.scale, None, dtype)


@fill_docstring(norm_args=_NORM_ARGS_DOC)
class GroupNorm(_Normalization):
    """Group normalization: the channels are split into groups, each normalized per example.

    The input is channels-last, ``(batch, *spatial, size)``: the **first** axis is the batch
    axis, the last holds the ``size`` channels, split into ``num_groups`` groups of
    ``size // num_groups`` consecutive channels, and every axis in between is spatial (there
    may be none). The mean and the biased variance are taken, per example and per group, over
    the spatial axes and the group's channels; then
    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with a per-channel ``scale`` and
    ``bias``. This is ``torch.nn.GroupNorm(num_groups, size)`` on ``(batch, size, *spatial)``.

    An input with several leading axes, e.g. ``(a, b, h, w, size)``, is read as batch ``a``
    with spatial axes ``(b, h, w)``: the examples along ``b`` share their statistics. To
    normalize each ``(a, b)`` example on its own, reshape the input to
    ``(a * b, h, w, size)`` and the output back.

    The variance is computed in two passes (the mean of squared deviations from the mean).
    Statistics and the normalization are computed in at least float32, then the output is cast
    to the computation dtype.

    Args:
        num_groups: number of channel groups; must divide ``size``. ``num_groups=1`` pools all
            channels (layer normalization over every non-batch axis), ``num_groups=size``
            normalizes each channel alone (instance normalization).
        size: number of channels (the last axis of the input).
        {norm_args}

    Raises:
        LayerConfigError: if ``num_groups`` or ``size`` is not a positive int,
            ``num_groups`` does not divide ``size``, or ``epsilon`` is negative.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.GroupNorm(2, 4))
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables)
        {'params': {'bias': (4,), 'scale': (4,)}}
        >>> x = jnp.arange(2 * 5 * 5 * 4, dtype=jnp.float32).reshape(2, 5, 5, 4)
        >>> y, _ = apply_fn(variables, None, x)
        >>> y.reshape(2, 25, 2, 2).mean(axis=(1, 3)).round(4)  # per example and group
        Array([[0., 0.],
               [0., 0.]], dtype=float32)
    """

    def __init__(
        self,
        num_groups: int,
        size: int,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = initializers.ones,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self._check(size, epsilon, dtype)
        self.num_groups = check_divisor("GroupNorm", "num_groups", num_groups, size=self.size)
        self._add_scale_and_bias(use_scale, use_bias, scale_init, bias_init, param_dtype)

    def extra_repr(self) -> str:
        config = f"num_groups={self.num_groups}, size={self.size}, epsilon={self.epsilon}"
        return _affine_repr(self, config)

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.GroupNorm``: ``weight`` is the scale."""
        return _torch_scale(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` per example and channel group.

        Args:
            x: input of shape ``(batch, *spatial, size)``, zero or more spatial axes; the
                first axis is the batch axis (see the class docstring for more leading axes).

        Returns:
            The normalized input, of the shape of ``x`` and the computation dtype.

        Raises:
            InputShapeError: if ``x`` has fewer than 2 axes or its last axis is not ``size``
                long.
        """
        x = _checked_input(self, x, 2, "(batch, *spatial, {size}) (2+ axes)", _BATCH_FIRST)
        dtype = compute_dtype(self.dtype, x, self.scale, self.bias)
        x = cast(x, at_least_float32(dtype))
        spatial = tuple(range(1, x.ndim - 1))
        y = _standardize(x, spatial, self.num_groups, self.epsilon)
        return _scale_and_shift(y, self.scale, self.bias, dtype)


@fill_docstring(norm_args=_NORM_ARGS_DOC)
class InstanceNorm(_AffineNorm):
    """Instance normalization: each channel of each example normalized over the spatial axes.

    The input is channels-last, ``(batch, *spatial, size)`` with at least one spatial axis:
    the **first** axis is the batch axis and the last holds the ``size`` channels. The mean
    and the biased variance are taken per example and per channel over the spatial axes; then
    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with a per-channel ``scale`` and
    ``bias``. This is ``torch.nn.InstanceNorm1d/2d/3d(size, affine=True)`` on
    ``(batch, size, *spatial)``. Note that PyTorch's default is ``affine=False``: build
    ``InstanceNorm(size, use_scale=False, use_bias=False)`` for that (or keep the defaults:
    the initial ``scale`` of ones and ``bias`` of zeros give the same output until trained).
    There are no running statistics: every call uses the statistics of its input, as PyTorch's
    default ``track_running_stats=False``.

    An input with several leading axes, e.g. ``(a, b, h, w, size)``, is read as batch ``a``
    with spatial axes ``(b, h, w)``, as in :class:`GroupNorm`; reshape to
    ``(a * b, h, w, size)`` to normalize each ``(a, b)`` example on its own.

    The variance is computed in two passes (the mean of squared deviations from the mean).
    Statistics and the normalization are computed in at least float32, then the output is cast
    to the computation dtype.

    Args:
        size: number of channels (the last axis of the input).
        {norm_args}

    Raises:
        LayerConfigError: if ``size`` is not a positive int or ``epsilon`` is negative.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.InstanceNorm(3))
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables)
        {'params': {'bias': (3,), 'scale': (3,)}}
        >>> x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3) ** 2
        >>> y, _ = apply_fn(variables, None, x)
        >>> y.std(axis=(1, 2)).round(3)  # per example and channel
        Array([[1., 1., 1.],
               [1., 1., 1.]], dtype=float32)
    """

    def extra_repr(self) -> str:
        return _affine_repr(self, f"size={self.size}, epsilon={self.epsilon}")

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.InstanceNorm``: ``weight`` is the scale."""
        return _torch_scale(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` per example and channel.

        Args:
            x: input of shape ``(batch, *spatial, size)``, one or more spatial axes; the first
                axis is the batch axis (see the class docstring for more leading axes).

        Returns:
            The normalized input, of the shape of ``x`` and the computation dtype.

        Raises:
            InputShapeError: if ``x`` has fewer than 3 axes or its last axis is not ``size``
                long.
        """
        x = _checked_input(
            self,
            x,
            3,
            "(batch, *spatial, {size}) with at least one spatial axis",
            _BATCH_FIRST,
        )
        dtype = compute_dtype(self.dtype, x, self.scale, self.bias)
        axes = tuple(range(1, x.ndim - 1))
        y = _standardize(cast(x, at_least_float32(dtype)), axes, None, self.epsilon)
        return _scale_and_shift(y, self.scale, self.bias, dtype)


_FEATURES_LAST = (
    "Put the features last (e.g. x.transpose(0, 2, 3, 1) for a PyTorch NCHW image), or build "
    "the layer with size equal to the input's last axis."
)
_BATCH_FIRST = (
    "The first axis is the batch (add one with x[None] for a single example), the channels "
    "are last (e.g. x.transpose(0, 2, 3, 1) for a PyTorch NCHW image); or build the layer "
    "with size equal to the input's last axis."
)


def _checked_input(
    module: LayerNorm | RMSNorm | GroupNorm | InstanceNorm,
    x: Any,
    min_ndim: int,
    layout: str,
    fix: str,
) -> jax.Array:
    """``x`` as an array, or an InputShapeError unless it has ``min_ndim`` axes or more and its
    last axis is ``module.size`` long; ``layout`` (formatted with ``size``) and ``fix`` are the
    expected shape and the advice in the message."""
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    shape = x.shape
    if len(shape) >= min_ndim and shape[-1] == module.size:
        return x
    raise errors.InputShapeError(
        f"{module_label(module)}: expected an input of shape {layout.format(size=module.size)}, "
        f"with size={module.size} features on the last axis, got shape {shape}. {fix}"
    )


def _mean(values: jax.Array, axes: tuple[int, ...], groups: int | None) -> jax.Array:
    """The mean of ``values`` over ``axes`` (size 1 there), or with ``groups``, over the spatial
    axes ``axes`` and then over each group of consecutive channels (the last axis), broadcast
    back to every channel of the group. Each channel has as many values, so the mean of the
    channels' means is the group's mean; every reduction runs in ``values``' own layout, which
    XLA's CPU code vectorizes along the channels (a ``(..., groups, channels per group)`` view
    puts a few channels on the fastest axis: forward and backward ~1.25x slower)."""
    means = jnp.mean(values, axis=axes, keepdims=True)
    if groups is None:
        return means
    grouped = means.reshape((*means.shape[:-1], groups, -1))
    group_means = jnp.mean(grouped, axis=-1, keepdims=True)
    return jnp.broadcast_to(group_means, grouped.shape).reshape(means.shape)


def _standardized(
    x: jax.Array, axes: tuple[int, ...], groups: int | None, epsilon: float, center: bool
) -> tuple[jax.Array, jax.Array]:
    """``y = (x - mean) / sqrt(var + epsilon)`` (``center``) or ``x / sqrt(mean(x²) +
    epsilon)``, the means as :func:`_mean`; and the multiplier ``1 / sqrt(...)``."""
    if center:
        # Two passes: the mean of squared deviations, never E[x^2] - E[x]^2, which loses all
        # precision when |mean| is large compared to the spread.
        x = x - _mean(x, axes, groups)
    multiplier = lax.rsqrt(_mean(jnp.square(x), axes, groups) + epsilon)
    return x * multiplier, multiplier


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _standardize(
    x: jax.Array, axes: tuple[int, ...], groups: int | None, epsilon: float, center: bool = True
) -> jax.Array:
    """The normalization of LayerNorm, RMSNorm (``center=False``), GroupNorm (``groups``) and
    InstanceNorm, before the scale and bias: see :func:`_standardized`.

    Centered, its derivative is the closed form ``dy = r * (dx - mean(dx) - y * mean(y *
    dx))``, with ``r`` the multiplier, rather than autodiff's trace of the two passes (without
    centering, autodiff's own, which is as short). It keeps two arrays for the backward pass
    (``y`` and ``r``) where the traced form keeps each intermediate; under ``mx.Repeat``
    (``lax.scan``) each one is a stacked buffer, and a 12-block GPT's scanned train step runs
    ~1.4x faster with the closed form.

    The tangent ``dx`` passes through ``lax.optimization_barrier``, so that the input gradient
    is one array. In a residual network it is added to the skip path's gradient, block after
    block, and without the barrier XLA fuses that chain of additions into every consumer,
    which recomputes it in each: a cost that grows with the square of the depth (a 12-block
    GPT's unrolled train step ran 1.2x slower on XLA:CPU). Forward-mode and higher-order
    derivatives, and ``vmap`` of them, are those of the formula (tested)."""
    return _standardized(x, axes, groups, epsilon, center)[0]


@_standardize.defjvp
def _standardize_jvp(
    axes: tuple[int, ...],
    groups: int | None,
    epsilon: float,
    center: bool,
    primals: tuple[jax.Array],
    tangents: tuple[jax.Array],
) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    dx = lax.optimization_barrier(dx)
    if not center:
        # Without centering, autodiff's derivative of the formula keeps as few arrays as the
        # closed form (x and r), and XLA:CPU fuses it better (RMSNorm alone: 0.95x).
        return jax.jvp(lambda x: _standardized(x, axes, groups, epsilon, False)[0], (x,), (dx,))
    y, multiplier = _standardized(x, axes, groups, epsilon, center)
    inner = dx - _mean(dx, axes, groups) - y * _mean(y * dx, axes, groups)
    return y, multiplier * inner


def _scale_and_shift(
    y: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dtype: jnp.dtype
) -> jax.Array:
    """``y * scale + bias`` over the last axis (either may be None) in ``y``'s dtype, cast to
    ``dtype``."""
    # Per-feature vectors take the rank of y (size-1 axes) to broadcast under
    # jax_numpy_rank_promotion="raise".
    feature_shape = (1,) * (y.ndim - 1) + (y.shape[-1],)
    if scale is not None:
        y = y * cast(scale, y.dtype).reshape(feature_shape)
    if bias is not None:
        y = y + cast(bias, y.dtype).reshape(feature_shape)
    return cast(y, dtype)


def _affine_repr(module: LayerNorm | GroupNorm | InstanceNorm, config: str) -> str:
    """``config``, followed by ``use_scale=False`` / ``use_bias=False`` where they are off."""
    if module.scale is None:
        config += ", use_scale=False"
    if module.bias is None:
        config += ", use_bias=False"
    return config


def _torch_scale(
    layer: BatchNorm | LayerNorm | RMSNorm | GroupNorm | InstanceNorm,
) -> list[TorchConversion]:
    """PyTorch's ``weight`` of a normalization layer is our ``scale``, when there is one."""
    return [] if layer.scale is None else [same("weight", "scale")]
