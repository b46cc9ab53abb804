"""Argument checks shared by layers: sizes, window sizes and padding."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

from metoryx import errors

#: ``"SAME"``, ``"VALID"``, one int for every side, one int per spatial axis, or one
#: ``(low, high)`` pair per spatial axis.
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

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


def positive_int(layer: str, name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer, else a ``LayerConfigError``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise errors.LayerConfigError(
            f"{layer}: `{name}` must be a positive int, got {value!r}. Pass a size such as "
            f"{name}=64."
        )
    return number


def check_timescale(name: str, value: Any) -> None:
    """Check the ``max_timescale`` of a sinusoidal or rotary encoding: a positive number."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not float(value) > 0:
        raise errors.LayerConfigError(
            f"{name}: `max_timescale` must be a positive number, got {value!r}. The usual "
            f"value is 10000.0 (RoPE's theta; LLaMA 3 uses 500000.0)."
        )
