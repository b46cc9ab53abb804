"""Initializers: functions that make a variable's starting array.

An initializer is any function ``init(key, shape, dtype=jnp.float32) -> jax.Array`` (see
:class:`Initializer`). The names here are factories that take the distribution's settings and
return one (``normal(stddev=0.02)``), except :func:`zeros` and :func:`ones`, which are
initializers themselves. Every :mod:`jax.nn.initializers` initializer fits the same slot. The
random ones here draw all values in one 1-d call and reshape, which has the same distribution
and compiles several times faster for multi-dim kernels.

**Kernel layout and fans.** Kernels are channels-last: a Dense kernel is ``(in, out)``, a Conv
kernel ``(*spatial, in / groups, out)``. The variance-scaling family (:func:`variance_scaling`,
``glorot_*``, ``lecun_*``, ``he_*``) reads the fans from that layout::

    receptive_field = product of the dims that are none of in_axis, out_axis, batch_axis
    fan_in  = shape[in_axis]  * receptive_field     # in_axis=-2 by default
    fan_out = shape[out_axis] * receptive_field     # out_axis=-1 by default

A ``(3, 3, 16, 32)`` Conv kernel has ``fan_in = 3 * 3 * 16 = 144`` and ``fan_out = 288``: the
numbers PyTorch computes for its ``(32, 16, 3, 3)`` weight, so PyTorch recipes carry over:

===============================================  ==============================================
PyTorch                                          metoryx
===============================================  ==============================================
``kaiming_uniform_(w, nonlinearity="relu")``     ``he_uniform()``
``kaiming_normal_(w, nonlinearity="relu")``      ``he_normal()``
``xavier_uniform_(w)``                           ``glorot_uniform()``
``xavier_normal_(w)``                            ``glorot_normal()``
default ``nn.Linear`` / ``nn.Conv*d`` weight     ``variance_scaling(1 / 3, "fan_in", "uniform")``
default bias of a layer with fan-in ``n``        ``uniform(-n ** -0.5, n ** -0.5)``
``orthogonal_(w, gain=g)``                       ``orthogonal(scale=g)``
===============================================  ==============================================

**Differences from jax.nn.initializers**, to match PyTorch and keep half precision faithful:

- ``glorot_normal``, ``lecun_normal`` and ``he_normal`` draw from an untruncated normal, as
  PyTorch's ``xavier_normal_`` and ``kaiming_normal_`` do (JAX and Keras cut at two standard
  deviations; ``variance_scaling(..., "truncated_normal")`` does that).
- ``uniform`` takes ``(minval, maxval)``, like ``uniform_``; ``normal`` and
  ``truncated_normal`` default to ``stddev=1.0``; the default dtype is ``float32`` whatever
  ``jax_enable_x64`` says.
- Half-precision arrays (``bfloat16``, ``float16``) are drawn in ``float32`` and rounded, so
  they equal the ``float32`` array rounded. Drawn directly in ``bfloat16``, JAX's samples take
  only 128 distinct values, with a mean off by -0.012 standard deviations and normal tails
  cut at 2.9.
- The uniform ones map the random bits to ``[minval, maxval)`` with one subtraction and one
  multiply, where ``jax.random.uniform`` multiplies and then adds: the same distribution, other
  last bits, and no fused multiply-add for the compiler to apply in one program and not in
  another (see "Drawn together" in :class:`Initializer`).
- Bad settings raise :class:`metoryx.errors.LayerConfigError` when the factory is called; a
  shape an initializer cannot fill raises it when the initializer is called.

Example:
    >>> import jax, metoryx as mx
    >>> init = mx.initializers.he_uniform()
    >>> kernel = init(jax.random.key(0), (3, 3, 16, 32))  # a Conv kernel: fan_in = 3 * 3 * 16
    >>> bound = (6 / (3 * 3 * 16)) ** 0.5
    >>> bool(abs(kernel).max() <= bound)
    True
"""

from __future__ import annotations

import difflib
import math
import struct
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, TypeAlias, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from metoryx._docstrings import fill_docstring
from metoryx.errors import LayerConfigError, VariableDefinitionError

__all__ = [
    "Initializer",
    "constant",
    "get",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "normal",
    "ones",
    "orthogonal",
    "truncated_normal",
    "uniform",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

Mode: TypeAlias = Literal["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]
Distribution: TypeAlias = Literal["truncated_normal", "normal", "uniform"]
Axes: TypeAlias = int | Sequence[int]

_LAYOUT_HINT = (
    "Kernels are channels-last: a Dense kernel is (in, out), a Conv kernel "
    "(*spatial, in / groups, out). A 1-d variable such as a bias or a norm scale has no fans: "
    "initialize it with zeros, ones, constant, normal or uniform."
)


class Initializer(Protocol):
    """The signature of every initializer: ``init(key, shape, dtype=jnp.float32) -> jax.Array``.

    Args:
        key: the random key to draw from (ignored by the constant initializers).
        shape: the shape of the array to make.
        dtype: the dtype of the array to make: the variable's storage dtype.

    Returns:
        A ``jax.Array`` of that shape and dtype.

    **Drawn together.** An initializer with the attribute ``vectorizable = True`` promises to be
    a pure, traceable function of its key: ``init_fn`` then draws all variables that share it
    (by ``==``), their shape and their dtype in one ``jax.vmap`` over their keys (a loop under
    ``jax.jit``), which keeps ``jax.jit(init_fn)`` of a deep model as small to compile as a
    shallow one. Each draw keeps its own key and runs the initializer's own operations, so it is
    the one-by-one draw, to the one limit the compiler sets: XLA:CPU decides per compiled kernel,
    by how it vectorises it (so by the CPU's vector width), whether a multiply and the add it
    feeds become one fused multiply-add, rounded once instead of twice. The uniform initializers
    here (:func:`uniform`, the ``*_uniform`` ones, ``variance_scaling(..., "uniform")``) have no
    such pair, so their grouped draws are the one-by-one bits on every CPU. The normal ones
    evaluate polynomials (the inverse error function), so theirs may differ in the last bits of
    the ``float32`` sample: by a few ``float32`` ulps of the largest value, and at most one ulp
    of a half-precision dtype after rounding. The random initializers made here have it, except
    :func:`orthogonal`, and two made by the same factory with the same settings are equal
    (``he_uniform() == he_uniform()``). Any other initializer is called once per variable;
    for those that ignore the key (:func:`zeros`, :func:`ones`, :func:`constant`) that is the
    cheaper way, as XLA merges their identical fills.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def halves(key, shape, dtype=jnp.float32):  # any such function is an Initializer
        ...     return jnp.full(shape, 0.5, dtype)
        >>> halves(jax.random.key(0), (2,))
        Array([0.5, 0.5], dtype=float32)
    """

    def __call__(
        self, key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32
    ) -> jax.Array: ...


class _Vectorizable:
    """An initializer made by a factory here, equal to another made with equal settings.

    ``init_fn`` groups variables by their initializer, so equality is what lets the layers of
    a model that each call ``normal(0.02)`` share one draw. Settings are compared by type and
    exact value (``-0.0`` is not ``0.0``: it can change the bits drawn); one that is not a
    plain number, string or tuple of ints makes the initializer equal only to itself.
    """

    __slots__ = ("_fn", "_name", "_settings", "_recipe")
    vectorizable = True

    def __init__(self, fn: Initializer, name: str, **settings: object):
        self._fn = fn
        self._name = name
        self._settings = settings
        recipe = [_comparable(v) for v in settings.values()]
        self._recipe = None if None in recipe else (name, *recipe)

    def __call__(
        self, key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32
    ) -> jax.Array:
        return self._fn(key, shape, dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Vectorizable):
            return NotImplemented
        return self is other or (self._recipe is not None and self._recipe == other._recipe)

    def __hash__(self) -> int:
        return id(self) if self._recipe is None else hash(self._recipe)

    def __deepcopy__(self, memo: dict[int, object]) -> _Vectorizable:
        return self  # immutable: mx.transform's deep copy of a model can share it

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        return f"{self._name}({args})"


def _comparable(value: object) -> object:
    """``value`` as a hashable key whose equality means the same bits drawn, or None."""
    if isinstance(value, float):
        return type(value), struct.pack("<d", value)
    if isinstance(value, (bool, int, str)):
        return type(value), value
    if isinstance(value, Sequence) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def zeros(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Initializer that makes an array of zeros; the usual one for biases.

    Args:
        key: ignored.
        shape: the shape of the array.
        dtype: the dtype of the array.

    Returns:
        An array of zeros.

    Example:
        >>> import jax, metoryx as mx
        >>> mx.initializers.zeros(jax.random.key(0), (2,))
        Array([0., 0.], dtype=float32)
    """
    return jnp.zeros(shape, dtype)


def ones(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Initializer that makes an array of ones; the usual one for normalization scales.

    Args:
        key: ignored.
        shape: the shape of the array.
        dtype: the dtype of the array.

    Returns:
        An array of ones.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> mx.initializers.ones(jax.random.key(0), (2,), jnp.bfloat16)
        Array([1, 1], dtype=bfloat16)
    """
    return jnp.ones(shape, dtype)


def constant(value: ArrayLike) -> Initializer:
    """Makes an initializer that fills the array with ``value``.

    Args:
        value: the fill value: a scalar, or an array that broadcasts to the shape.

    Returns:
        An initializer; ``value`` is cast to the dtype it is asked for.

    Example:
        >>> import jax, metoryx as mx
        >>> mx.initializers.constant(-0.5)(jax.random.key(0), (2,))
        Array([-0.5, -0.5], dtype=float32)
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return jnp.full(shape, value, dtype)

    return init


def normal(stddev: float = 1.0, mean: float = 0.0) -> Initializer:
    """Makes an initializer that draws from the normal distribution N(mean, stddev²).

    Args:
        stddev: the standard deviation, ``>= 0``.
        mean: the mean.

    Returns:
        An initializer.

    Raises:
        LayerConfigError: ``stddev`` is negative or not finite, or ``mean`` is not finite.

    Example:
        >>> import jax, metoryx as mx
        >>> x = mx.initializers.normal(stddev=0.02)(jax.random.key(0), (512, 1024))
        >>> round(float(x.std()), 3)
        0.02
    """
    _check_stddev("normal", stddev)
    if not math.isfinite(mean):
        raise LayerConfigError(f"normal: mean must be a finite number, got mean={mean!r}.")
    draw = jax.nn.initializers.normal(stddev)

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return _draw_flat(lambda k, n, d: draw(k, n, d) + jnp.asarray(mean, d), key, shape, dtype)

    return _Vectorizable(init, "normal", stddev=stddev, mean=mean)


def truncated_normal(stddev: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> Initializer:
    """Makes an initializer that draws from a normal distribution cut to an interval.

    Draws from N(0, stddev²) restricted to ``(lower * stddev, upper * stddev)``: the bounds are
    in units of ``stddev``, and ``stddev`` is that of the normal *before* the cut, so the spread
    of the values is smaller (``0.88 * stddev`` for the default bounds). PyTorch's
    ``trunc_normal_(w, std=s, a=-2 * s, b=2 * s)`` is ``truncated_normal(s)``; note that its
    default bounds ``a=-2, b=2`` are absolute, not in units of ``std``.

    Args:
        stddev: the standard deviation of the normal before the cut, ``>= 0``.
        lower: the lower bound, in units of ``stddev``.
        upper: the upper bound, in units of ``stddev``; greater than ``lower``.

    Returns:
        An initializer.

    Raises:
        LayerConfigError: ``stddev`` is negative or not finite, or ``lower >= upper``.

    Example:
        >>> import jax, metoryx as mx
        >>> x = mx.initializers.truncated_normal(stddev=0.02)(jax.random.key(0), (512, 1024))
        >>> bool(abs(x).max() <= 2 * 0.02)
        True
    """
    _check_stddev("truncated_normal", stddev)
    if not lower < upper:
        raise LayerConfigError(
            f"truncated_normal: lower must be less than upper, got lower={lower!r}, "
            f"upper={upper!r}. Both are in units of stddev: the default (-2.0, 2.0) keeps "
            "values within two standard deviations."
        )
    draw = jax.nn.initializers.truncated_normal(stddev, lower=lower, upper=upper)

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return _draw_flat(draw, key, shape, dtype)

    return _Vectorizable(init, "truncated_normal", stddev=stddev, lower=lower, upper=upper)


def uniform(minval: float = 0.0, maxval: float = 1.0) -> Initializer:
    """Makes an initializer that draws uniformly from ``[minval, maxval)``, like ``uniform_``.

    Args:
        minval: the lower bound (included).
        maxval: the upper bound (excluded); greater than ``minval``.

    Returns:
        An initializer.

    Raises:
        LayerConfigError: the bounds are not finite, or ``minval >= maxval``.

    Example:
        >>> import jax, metoryx as mx
        >>> bound = 1 / 64**0.5  # PyTorch's default Dense init with fan_in = 64
        >>> kernel = mx.initializers.uniform(-bound, bound)(jax.random.key(0), (64, 128))
        >>> bool(abs(kernel).max() <= bound)
        True
    """
    if not (math.isfinite(minval) and math.isfinite(maxval) and minval < maxval):
        raise LayerConfigError(
            f"uniform: expected finite bounds with minval < maxval, got minval={minval!r}, "
            f"maxval={maxval!r}. For every value equal to c, use constant(c)."
        )

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return _draw_flat(lambda k, n, d: _uniform(k, n, d, minval, maxval), key, shape, dtype)

    return _Vectorizable(init, "uniform", minval=minval, maxval=maxval)


def variance_scaling(
    scale: float,
    mode: Mode,
    distribution: Distribution,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
) -> Initializer:
    """Makes an initializer whose variance is ``scale / n``, ``n`` a fan of the kernel's shape.

    The fans are read from the channels-last layout (see the module docs): ``fan_in`` is
    ``shape[in_axis]`` times the receptive field, ``fan_out`` is ``shape[out_axis]`` times it,
    and the receptive field is the product of the dims named by no axis argument. ``n`` is
    ``fan_in``, ``fan_out``, their mean (``"fan_avg"``) or their geometric mean
    (``"fan_geo_avg"``). With ``"uniform"`` the bounds are ``±sqrt(3 * scale / n)``; with
    ``"truncated_normal"`` the values lie within two standard deviations and the standard
    deviation *after* the cut is ``sqrt(scale / n)``. An array with no elements is returned
    as is.

    For a PyTorch recipe with gain ``g``, use ``scale = g ** 2``: ``kaiming_normal_(w,
    nonlinearity="tanh")`` is ``variance_scaling((5 / 3) ** 2, "fan_in", "normal")``.

    Args:
        scale: the variance multiplier, ``> 0``.
        mode: which fan divides ``scale``: ``"fan_in"``, ``"fan_out"``, ``"fan_avg"`` or
            ``"fan_geo_avg"``.
        distribution: ``"normal"``, ``"truncated_normal"`` or ``"uniform"``.
        in_axis: the axis (or axes) of the inputs.
        out_axis: the axis (or axes) of the outputs.
        batch_axis: axes that hold independent kernels (e.g. a stack of layers); they count
            in no fan.

    Returns:
        An initializer. It raises :class:`~metoryx.errors.LayerConfigError` for a shape that
        lacks the axes, or where two axis arguments name the same axis.

    Raises:
        LayerConfigError: ``scale`` is not a positive finite number, or ``mode`` or
            ``distribution`` is unknown.

    Example:
        >>> import jax, metoryx as mx
        >>> init = mx.initializers.variance_scaling(2.0, "fan_out", "uniform")
        >>> kernel = init(jax.random.key(0), (64, 128))  # fan_out = 128
        >>> bool(abs(kernel).max() <= (3 * 2.0 / 128) ** 0.5)
        True
    """
    where = f"variance_scaling(scale={scale!r}, mode={mode!r}, distribution={distribution!r})"
    if not (math.isfinite(scale) and scale > 0):
        raise LayerConfigError(
            f"{where}: scale must be a positive finite number, got scale={scale!r}. For an "
            "all-zero start, use zeros."
        )
    _check_choice(where, "mode", mode, get_args(Mode))
    _check_choice(where, "distribution", distribution, get_args(Distribution))

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        _check_axes(where, shape, in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)
        if math.prod(shape) == 0:
            return jnp.zeros(shape, dtype)  # nothing to draw, and the fan may be zero
        fan_in, fan_out = _fans(shape, in_axis, out_axis, batch_axis)
        fan = {
            "fan_in": fan_in,
            "fan_out": fan_out,
            "fan_avg": (fan_in + fan_out) / 2,
            "fan_geo_avg": math.sqrt(fan_in * fan_out),
        }[mode]
        std = math.sqrt(scale / fan)
        if distribution == "normal":
            draw = jax.nn.initializers.normal(std)
        elif distribution == "uniform":
            bound = math.sqrt(3.0) * std
            draw = lambda k, n, d: _uniform(k, n, d, -bound, bound)  # noqa: E731
        else:  # the cut at 2 standard deviations shrinks the spread: undo it
            draw = jax.nn.initializers.truncated_normal(std / _TRUNCATED_STD)
        return _draw_flat(draw, key, shape, dtype)

    return _Vectorizable(
        init,
        "variance_scaling",
        scale=scale,
        mode=mode,
        distribution=distribution,
        in_axis=in_axis,
        out_axis=out_axis,
        batch_axis=batch_axis,
    )


# The arguments and result of the shortcuts for variance_scaling below.
_FAN_AXES_DOC = """
Args:
    in_axis: the axis (or axes) of the inputs.
    out_axis: the axis (or axes) of the outputs.
    batch_axis: axes that hold independent kernels; they count in no fan.

Returns:
    An initializer.
"""


@fill_docstring(fan_axes=_FAN_AXES_DOC)
def glorot_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Makes a Glorot (Xavier) uniform initializer: bounds ``±sqrt(6 / (fan_in + fan_out))``.

    The same distribution as PyTorch's ``xavier_uniform_(w)`` (gain 1);
    ``variance_scaling(1.0, "fan_avg", "uniform")``. Also named :func:`xavier_uniform`.

    {fan_axes}

    Example:
        >>> import jax, metoryx as mx
        >>> kernel = mx.initializers.glorot_uniform()(jax.random.key(0), (64, 128))
        >>> bool(abs(kernel).max() <= (6 / (64 + 128)) ** 0.5)
        True
    """
    return variance_scaling(1.0, "fan_avg", "uniform", in_axis, out_axis, batch_axis)


@fill_docstring(fan_axes=_FAN_AXES_DOC)
def glorot_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Makes a Glorot (Xavier) normal initializer: N(0, 2 / (fan_in + fan_out)).

    The same distribution as PyTorch's ``xavier_normal_(w)`` (gain 1), untruncated;
    ``variance_scaling(1.0, "fan_avg", "normal")``. Also named :func:`xavier_normal`.

    {fan_axes}

    Example:
        >>> import jax, metoryx as mx
        >>> kernel = mx.initializers.glorot_normal()(jax.random.key(0), (512, 1024))
        >>> round(float(kernel.std()), 2), round((2 / (512 + 1024)) ** 0.5, 2)
        (0.04, 0.04)
    """
    return variance_scaling(1.0, "fan_avg", "normal", in_axis, out_axis, batch_axis)


@fill_docstring(fan_axes=_FAN_AXES_DOC)
def lecun_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Makes a LeCun uniform initializer: bounds ``±sqrt(3 / fan_in)``.

    ``variance_scaling(1.0, "fan_in", "uniform")``.

    {fan_axes}

    Example:
        >>> import jax, metoryx as mx
        >>> kernel = mx.initializers.lecun_uniform()(jax.random.key(0), (64, 128))
        >>> bool(abs(kernel).max() <= (3 / 64) ** 0.5)
        True
    """
    return variance_scaling(1.0, "fan_in", "uniform", in_axis, out_axis, batch_axis)


@fill_docstring(fan_axes=_FAN_AXES_DOC)
def lecun_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Makes a LeCun normal initializer: N(0, 1 / fan_in), the one SELU networks need.

    Untruncated, as in the SELU paper and PyTorch's ``kaiming_normal_(w,
    nonlinearity="linear")``; ``variance_scaling(1.0, "fan_in", "normal")``. For JAX's and
    Keras's truncated variant, use ``variance_scaling(1.0, "fan_in", "truncated_normal")``.

    {fan_axes}

    Example:
        >>> import jax, metoryx as mx
        >>> kernel = mx.initializers.lecun_normal()(jax.random.key(0), (512, 1024))
        >>> round(float(kernel.std()), 2), round((1 / 512) ** 0.5, 2)
        (0.04, 0.04)
    """
    return variance_scaling(1.0, "fan_in", "normal", in_axis, out_axis, batch_axis)


@fill_docstring(fan_axes=_FAN_AXES_DOC)
def he_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Makes a He (Kaiming) uniform initializer: bounds ``±sqrt(6 / fan_in)``, for ReLU nets.

    The same distribution as PyTorch's ``kaiming_uniform_(w, mode="fan_in",
    nonlinearity="relu")``; ``variance_scaling(2.0, "fan_in", "uniform")``. Also named
    :func:`kaiming_uniform`.

    {fan_axes}

    Example:
        >>> import jax, metoryx as mx
        >>> kernel = mx.initializers.he_uniform()(jax.random.key(0), (64, 128))
        >>> bool(abs(kernel).max() <= (6 / 64) ** 0.5)
        True
    """
    return variance_scaling(2.0, "fan_in", "uniform", in_axis, out_axis, batch_axis)


@fill_docstring(fan_axes=_FAN_AXES_DOC)
def he_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = ()) -> Initializer:
    """Makes a He (Kaiming) normal initializer: N(0, 2 / fan_in), for ReLU nets.

    The same distribution as PyTorch's ``kaiming_normal_(w, mode="fan_in",
    nonlinearity="relu")``, untruncated; ``variance_scaling(2.0, "fan_in", "normal")``. Also
    named :func:`kaiming_normal`.

    {fan_axes}

    Example:
        >>> import jax, metoryx as mx
        >>> kernel = mx.initializers.he_normal()(jax.random.key(0), (512, 1024))
        >>> round(float(kernel.std()), 2), round((2 / 512) ** 0.5, 2)
        (0.06, 0.06)
    """
    return variance_scaling(2.0, "fan_in", "normal", in_axis, out_axis, batch_axis)


xavier_uniform = glorot_uniform
xavier_normal = glorot_normal
kaiming_uniform = he_uniform
kaiming_normal = he_normal


def orthogonal(scale: float = 1.0, column_axis: int = -1) -> Initializer:
    """Makes an initializer of (scaled) random orthogonal matrices, for recurrent kernels.

    The array is viewed as a matrix with ``shape[column_axis]`` columns and the product of the
    other dims as rows; for a kernel ``(*spatial, in, out)`` that is ``(fan_in, out)``. The
    columns are orthonormal when there are at least as many rows (``W.T @ W = scale² I``),
    the rows otherwise: the transpose of what PyTorch's ``orthogonal_(w, gain=scale)`` makes
    of its ``(out, in, *spatial)`` weight.

    Args:
        scale: the factor applied to the orthogonal matrix (PyTorch's ``gain``).
        column_axis: the axis of the columns.

    Returns:
        An initializer. It raises :class:`~metoryx.errors.LayerConfigError` for a shape with
        fewer than two dims, or without ``column_axis``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> w = mx.initializers.orthogonal()(jax.random.key(0), (64, 128))  # rows orthonormal
        >>> bool(jnp.allclose(w @ w.T, jnp.eye(64), atol=1e-5))
        True
    """
    draw = jax.nn.initializers.orthogonal(scale, column_axis)

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        where = f"orthogonal(scale={scale!r}, column_axis={column_axis!r})"
        if len(shape) < 2:
            raise LayerConfigError(
                f"{where} cannot fill shape {shape}: an orthogonal matrix needs at least 2 "
                f"dims. {_LAYOUT_HINT}"
            )
        _check_axes(where, shape, column_axis=column_axis)
        return draw(key, shape, _sampling_dtype(dtype)).astype(dtype)

    # Not vectorizable: a batch of QRs may take another algorithm than one QR (cuSOLVER's
    # batched kernels on GPU), so drawing orthogonal kernels together could change their bits.
    return init


def get(init: Initializer | str) -> Initializer:
    """The initializer ``init`` names: a name such as ``"zeros"`` or ``"he_normal"`` gives
    that initializer with its default settings; an initializer is returned as it is.

    Every :class:`metoryx.Parameter` and :class:`metoryx.State` resolves its ``init`` here, so
    every layer's ``*_init`` argument takes a name too: ``mx.Dense(3, 4,
    kernel_init="glorot_uniform")``. The names are those of :data:`NAMES`; initializers that
    need a setting (``constant``, ``variance_scaling``) have none, pass
    ``constant(0.1)`` itself.

    Args:
        init: an initializer ``init(key, shape, dtype) -> jax.Array``, or one of :data:`NAMES`.

    Returns:
        The initializer.

    Raises:
        VariableDefinitionError: for an unknown name (the message lists the known ones) or a
            value that is neither a name nor callable.

    Example:
        >>> import jax, metoryx as mx
        >>> mx.initializers.get("ones")(jax.random.key(0), (2,))
        Array([1., 1.], dtype=float32)
        >>> mx.initializers.get("he_normal") == mx.initializers.he_normal()
        True
    """
    if isinstance(init, str):
        factory = _NAMED.get(init)
        if factory is None:
            close = difflib.get_close_matches(init, NAMES, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise VariableDefinitionError(
                f"unknown initializer name {init!r}; the names are {', '.join(NAMES)}. {hint}"
                f"For one with settings, pass the initializer itself, e.g. "
                f"mx.initializers.normal(0.02) or mx.initializers.constant(0.1)."
            )
        return factory()
    if not callable(init):
        raise VariableDefinitionError(
            f"expected an initializer, a function (key, shape, dtype) -> array such as "
            f"mx.initializers.lecun_normal(), or its name ('zeros', 'lecun_normal', ...); got "
            f"{type(init).__name__} {init!r:.60}. To start from a given array, keep an "
            f"initializer and set `.value = array` on the variable."
        )
    return init


# Each name's initializer with its default settings, made on demand.
_NAMED: dict[str, Callable[[], Initializer]] = {
    "zeros": lambda: zeros,
    "ones": lambda: ones,
    "normal": normal,
    "truncated_normal": truncated_normal,
    "uniform": uniform,
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "lecun_uniform": lecun_uniform,
    "lecun_normal": lecun_normal,
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "kaiming_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "orthogonal": orthogonal,
}

#: The names :func:`get` (and so every ``init`` argument) accepts, each the initializer of
#: that name with its default settings.
NAMES: tuple[str, ...] = tuple(_NAMED)


# The standard deviation of a unit normal cut to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


def _fans(
    shape: tuple[int, ...], in_axis: Axes, out_axis: Axes, batch_axis: Axes
) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a channels-last kernel (see the module docs)."""
    ndim = len(shape)

    def dims(axes: Axes) -> set[int]:
        return {a % ndim for a in ((axes,) if isinstance(axes, int) else axes)}

    ins, outs, batch = dims(in_axis), dims(out_axis), dims(batch_axis)
    receptive = math.prod(d for i, d in enumerate(shape) if i not in ins | outs | batch)
    fan_in = math.prod(shape[i] for i in ins) * receptive
    fan_out = math.prod(shape[i] for i in outs) * receptive
    return fan_in, fan_out


def _draw_flat(
    sample: Callable[..., jax.Array], key: jax.Array, shape: Sequence[int], dtype: DTypeLike
) -> jax.Array:
    """``sample(key, (n,), dtype)`` of all ``n`` values in one 1-d draw, reshaped to ``shape``.

    Independent draws have the same distribution in any layout, and XLA compiles a 1-d sampler
    many times faster than one over several small dims (measured here: 0.4 s against 6-10 s
    for a ``(2, 3, 3, 8, 16)`` kernel), which is most of the first init of a Conv model.
    """
    shape = tuple(shape)
    flat = sample(key, (math.prod(shape),), _sampling_dtype(dtype))
    return flat.reshape(shape).astype(dtype)


def _uniform(
    key: jax.Array, shape: Sequence[int], dtype: DTypeLike, minval: float, maxval: float
) -> jax.Array:
    """Uniform draws in ``[minval, maxval)`` whose bits no compiler choice can change.

    ``jax.random.uniform`` maps a draw ``u`` in ``[0, 1)`` to ``u * (maxval - minval) + minval``:
    a multiply feeding an add, which XLA:CPU may compile into one fused multiply-add (one
    rounding) or into two roundings, decided per kernel by how it vectorises it, so by the CPU's
    vector width and by what else the kernel holds. Where the sum nearly cancels (values near 0
    of symmetric bounds) the two differ by dozens of ulps, and the same draw made alone and in a
    group (``_core/init.py``) could round differently. Here ``f`` in ``[1, 2)`` is made exactly
    from the bits, then ``(f - c) * s``: one subtraction (exact when ``minval <= 0 <= maxval``)
    and one multiply, each rounded once, then a clamp; no multiply feeds an add.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jax.random.uniform(key, shape, dtype, minval, maxval)  # JAX's own error
    info = jnp.finfo(dtype)
    uint = jnp.dtype(f"uint{info.bits}")
    bits = jax.random.bits(key, tuple(shape), uint)
    one = np.array(1, dtype).view(uint)
    floats = lax.bitcast_convert_type((bits >> (info.bits - info.nmant)) | one, dtype)
    scale = maxval - minval
    values = (floats - np.array(1.0 - minval / scale, dtype)) * np.array(scale, dtype)
    low = np.array(minval, dtype)
    return lax.clamp(low, values, np.nextafter(np.array(maxval, dtype), low))


def _sampling_dtype(dtype: DTypeLike) -> DTypeLike:
    """Float32 for floats narrower than it: the array is drawn in float32, then rounded.

    Drawn directly in bfloat16, JAX's samples take only 128 distinct values, their mean is off
    by -0.012 standard deviations and normal tails stop at 2.9; there is no half-precision QR
    either. Rounding float32 draws keeps the distribution, as PyTorch does.
    """
    narrow = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4
    return jnp.float32 if narrow else dtype


def _check_stddev(where: str, stddev: float) -> None:
    if not (math.isfinite(stddev) and stddev >= 0):
        raise LayerConfigError(
            f"{where}: stddev must be a finite number >= 0, got stddev={stddev!r}. For every "
            "value equal to c, use constant(c)."
        )


def _check_choice(where: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise LayerConfigError(
        f"{where}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}.{hint}"
    )


def _check_axes(where: str, shape: tuple[int, ...], **axes: Axes) -> None:
    """Checks that each axis argument names dims of ``shape``, and no dim twice."""
    ndim = len(shape)
    seen: set[int] = set()
    for name, value in axes.items():
        for axis in (value,) if isinstance(value, int) else value:
            if not -ndim <= axis < ndim:
                raise LayerConfigError(
                    f"{where} cannot fill shape {shape}: {name}={value!r} is not an axis of a "
                    f"{ndim}-d array. {_LAYOUT_HINT}"
                )
            if axis % ndim in seen:
                given = ", ".join(f"{k}={v!r}" for k, v in axes.items())
                raise LayerConfigError(
                    f"{where}: the axis arguments must name different dims of shape {shape}, "
                    f"got {given}."
                )
            seen.add(axis % ndim)
