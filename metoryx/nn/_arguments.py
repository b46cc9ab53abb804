"""Argument checks shared by layers: sizes, window sizes, padding, numbers in a range
(epsilon, momentum, rates), divisors and functions.

Each check returns the value in its normalized form (an int, a float, a tuple) or raises a
``LayerConfigError`` that names the layer and the argument, says what was expected and what
was given, and how to fix it. CONTRIBUTING.md ("Layer argument conventions") lists which
layer argument goes through which check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

from metoryx import errors

#: ``"SAME"``, ``"VALID"``, one int for every side, one int per spatial axis, or one
#: ``(low, high)`` pair per spatial axis.
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

#: Sizes, window sizes and paddings stay below this: an array axis has at most 2**63 - 1
#: elements (XLA's sizes are int64), so a larger one could only fail later, inside JAX.
MAX_SIZE = 2**63

_PADDING_HELP = (
    '"SAME", "VALID", an int p (p on both sides of every spatial axis), one int per spatial '
    "axis, or one (low, high) pair per spatial axis"
)


def window_sizes(layer: str, name: str, value: Any, ndim: int | None) -> tuple[int, ...]:
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
    return tuple(positive_int(layer, name, size) for size in sizes)


def parse_padding(layer: str, value: Any, ndim: int) -> str | tuple[tuple[int, int], ...]:
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
    if len(pads) != ndim or any(len(p) != 2 or min(p) < 0 or max(p) >= MAX_SIZE for p in pads):
        raise errors.LayerConfigError(
            f"{layer}: `padding` must be {_PADDING_HELP}, for {ndim} spatial axes and with "
            f"non-negative sizes below 2**63; got {value!r:.80}."
        )
    return tuple((low, high) for low, high in pads)


def _pad_pair(value: Any) -> tuple[int, ...]:
    """``p`` as ``(p, p)``, a pair as itself; TypeError for anything but ints."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_strict_index(v) for v in value)
    return (_strict_index(value),) * 2


def _strict_index(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    return operator.index(value)


def check_window_fits(
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
    pads = ((0, 0),) * len(window) if isinstance(padding, str) else padding
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


def positive_int(layer: str, name: str, value: Any, fix: str | None = None) -> int:
    """``value`` as an int if it is a positive integer, else a ``LayerConfigError`` that ends
    with ``fix`` (by default, an example size)."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or not 1 <= number < MAX_SIZE:
        past = " past 2**63 - 1, which no array axis can have" if number >= MAX_SIZE else ""
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be a positive int, got {value!r}{past}. "
            f"{fix or f'Pass a size such as {name}=64.'}"
        )
    return number


def non_negative_ints(layer: str, name: str, value: Any, ndim: int) -> tuple[int, ...]:
    """An int or ``ndim`` ints, each ``>= 0``, as an ``ndim``-tuple."""
    values = value if isinstance(value, Sequence) else (value,) * ndim
    try:
        sizes = tuple(-1 if isinstance(v, bool) else operator.index(v) for v in values)
    except TypeError:
        sizes = ()
    if len(sizes) != ndim or min(sizes) < 0 or max(sizes) >= MAX_SIZE:
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be a non-negative int or {ndim} of them (one per spatial "
            f"axis of the {ndim}-d kernel_size), below 2**63; got {value!r:.80}. E.g. {name}=1."
        )
    return sizes


def check_divisor(layer: str, name: str, value: Any, **multiples: int) -> int:
    """``value`` as an int if it is a positive int that divides every size in ``multiples``
    (given by name, e.g. ``in_size=4, out_size=6``)."""
    count = positive_int(layer, name, value)
    if any(size % count for size in multiples.values()):
        common = math.gcd(*multiples.values())
        choices = [d for d in range(1, common + 1) if common % d == 0]
        sizes = " and ".join(f"{key}={size}" for key, size in multiples.items())
        both, shared = ("both ", "common ") if len(multiples) > 1 else ("", "")
        raise errors.LayerConfigError(
            f"{layer}: {name}={count} must divide {both}{sizes}, so that every group is the "
            f"same size. Choose one of the {shared}divisors {choices} ({name}={choices[-1]} is "
            f"the largest), or change the sizes."
        )
    return count


def check_number(
    layer: str,
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    fix: str,
) -> float:
    """``value`` as a float if it is a finite real number between ``low`` and ``high``
    (included unless ``low_open``/``high_open``); the error ends with ``fix``."""
    try:
        given = math.nan if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):  # not a number, or a traced value
        given = math.nan
    too_low = given <= low if low_open else given < low
    too_high = given >= high if high_open else given > high
    if not math.isfinite(given) or too_low or too_high:
        if high == math.inf:
            bounds = f"{'>' if low_open else '>='} {low:g}"
        else:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be a finite number {bounds}, got {value!r}. {fix}"
        )
    return given


def check_epsilon(layer: str, value: Any, name: str = "epsilon") -> float:
    """A non-negative ``epsilon``: 0 is allowed (exact whenever the variance or norm it
    guards is positive), a negative one could take the square root of a negative number."""
    return check_number(
        layer,
        name,
        value,
        0.0,
        fix=f"It keeps a square root or a division away from zero: pass a small number "
        f"such as {name}=1e-5.",
    )


def check_rate(layer: str, name: str, value: Any) -> float:
    """A dropout rate, in ``[0, 1]`` (1 drops everything, as in PyTorch and Flax)."""
    return check_number(
        layer,
        name,
        value,
        0.0,
        1.0,
        fix=f"It is the probability of dropping an element; for a keep probability p, pass "
        f"{name}=1 - p.",
    )


def check_function(layer: str, name: str, value: Any, example: str) -> Any:
    """``value`` if it is callable; ``example`` is a call to suggest, e.g. ``mx.relu``."""
    if not callable(value):
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be a function or module of one input, such as "
            f"{example}, got {value!r}."
        )
    return value


def check_timescale(name: str, value: Any) -> float:
    """The ``max_timescale`` of a sinusoidal or rotary encoding: a positive number."""
    return check_number(
        name,
        "max_timescale",
        value,
        0.0,
        low_open=True,
        fix="The usual value is 10000.0 (RoPE's theta; LLaMA 3 uses 500000.0).",
    )
