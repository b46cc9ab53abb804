"""BatchNorm: normalization by batch statistics, with running averages for evaluation."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter, State
from metoryx.initializers import Initializer
from metoryx.nn._arguments import positive_int
from metoryx.nn._compute import cast, compute_dtype


class BatchNorm(Module):
    """Batch normalization over the last axis (features), statistics over all other axes.

    In training (``is_training=True``) the input is normalized with the statistics of the
    batch, ``(x - mean) / sqrt(var + epsilon) * scale + bias``, and the running statistics are
    updated; in evaluation it is normalized with the running statistics and nothing changes.

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
        epsilon: added to the variance before the square root.
        use_scale: whether to multiply by a learned ``scale`` (``params["scale"]``).
        use_bias: whether to add a learned ``bias`` (``params["bias"]``).
        axis_name: the name of a mapped axis to average statistics across devices over, or
            None for per-device statistics.
        scale_init: initializer of ``scale``, of shape ``(size,)``.
        bias_init: initializer of ``bias``, of shape ``(size,)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if ``size`` is not a positive int or ``momentum`` is outside
            ``[0, 1]``.

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
    """

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
        self.size = positive_int("BatchNorm", "size", size)
        if not 0.0 <= momentum <= 1.0:
            raise errors.LayerConfigError(
                f"BatchNorm: `momentum` must be in [0, 1], got {momentum!r}. It is the weight "
                f"of the old running statistics (Flax's convention), so PyTorch's momentum=0.1 "
                f"is momentum=0.9 here: pass 1 - PyTorch's value."
            )
        self.momentum = momentum
        self.epsilon = epsilon
        self.axis_name = axis_name
        self.dtype = dtype
        self.scale = Parameter(scale_init, (self.size,), param_dtype) if use_scale else None
        self.bias = Parameter(bias_init, (self.size,), param_dtype) if use_bias else None
        stats_dtype = _at_least_float32(param_dtype)
        self.mean = State("batch_stats", initializers.zeros, (self.size,), stats_dtype)
        self.var = State("batch_stats", initializers.ones, (self.size,), stats_dtype)

    def extra_repr(self) -> str:
        config = f"size={self.size}, momentum={self.momentum}, epsilon={self.epsilon}"
        if self.axis_name is not None:
            config += f", axis_name={self.axis_name!r}"
        return config

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """Normalizes ``x``.

        Args:
            x: input of shape ``(..., size)``.
            is_training: True to normalize with the batch statistics and update the running
                ones, False to normalize with the running statistics.

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
        stats_dtype = _at_least_float32(dtype)
        x_stats = cast(x, stats_dtype)
        # Per-feature vectors take the rank of x (size-1 axes) to broadcast under
        # jax_numpy_rank_promotion="raise".
        feature_shape = (1,) * (len(shape) - 1) + (self.size,)
        if is_training:
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


def _at_least_float32(dtype: Any) -> jnp.dtype:
    """float32 for narrower floats (bfloat16, float16), the dtype itself if wider."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)
