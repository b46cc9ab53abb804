"""Positional encodings: the Transformer's sinusoidal table and rotary embeddings (RoPE).

Both use the same frequencies: pair ``i`` of ``features`` (or ``head_dim``) channels turns at
``max_timescale ** (-2 i / features)`` radians per position, from 1 down to nearly
``1 / max_timescale``. Angles are computed in float32 (float64 for float64 outputs), as in
the reference implementations; positions beyond ~1e5 lose angle precision in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metoryx import errors
from metoryx._core.module import function_label
from metoryx._core.variables import numeric_dtype
from metoryx.nn._arguments import check_timescale, positive_int
from metoryx.nn._compute import cast


def sinusoidal_embedding(
    positions: jax.Array,
    features: int,
    max_timescale: float = 10000.0,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The sinusoidal position encoding of "Attention Is All You Need", in [sin | cos] halves.

    For ``h = features // 2`` and ``w_i = max_timescale ** (-2 i / features)``,
    ``out[..., i] = sin(p * w_i)`` and ``out[..., h + i] = cos(p * w_i)`` for ``i < h``: the
    sines fill the first half and the cosines the second, as in tensor2tensor and Flax. The
    paper (and PyTorch's tutorial) **interleaves** them, ``sin`` at even and ``cos`` at odd
    channels; the values are the same, permuted. To get that layout:
    ``out.reshape(*out.shape[:-1], 2, h).swapaxes(-1, -2).reshape(out.shape)``.

    Args:
        positions: integer or floating positions, of any shape (e.g. ``jnp.arange(seq)``).
        features: the size of each encoding, a positive even int.
        max_timescale: the longest wavelength is ``2 pi max_timescale`` positions.
        dtype: the dtype of the result, a floating dtype.

    Returns:
        The encodings, of shape ``(*positions.shape, features)`` and dtype ``dtype``.

    Raises:
        LayerConfigError: if ``features`` is not a positive even int, ``max_timescale`` is
            not positive or ``dtype`` is not a floating dtype.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> table = mx.sinusoidal_embedding(jnp.arange(3), 4)
        >>> table.shape
        (3, 4)
        >>> table[0]  # sin(0) = 0 in the first half, cos(0) = 1 in the second
        Array([0., 0., 1., 1.], dtype=float32)
        >>> interleaved = table.reshape(3, 2, 2).swapaxes(-1, -2).reshape(3, 4)  # the paper's
        >>> interleaved[0]
        Array([0., 1., 0., 1.], dtype=float32)
    """
    name = "sinusoidal_embedding"
    _check_size(name, "features", features)
    found = None if dtype is None else numeric_dtype(dtype)
    if found is None or not jnp.issubdtype(found, jnp.floating):
        raise errors.LayerConfigError(
            f"{name}: `dtype` is the dtype of the encodings (sines and cosines) and must be a "
            f"floating dtype, got {dtype!r:.60}. Pass e.g. dtype=jnp.float32 or jnp.bfloat16."
        )
    dtype = found
    check_timescale(name, max_timescale)
    angles = _angles(positions, features, max_timescale, dtype)
    return cast(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1), dtype)


def rotary_frequencies(head_dim: int, max_timescale: float = 10000.0) -> jax.Array:
    """The angular frequencies of rotary embeddings: ``max_timescale ** (-2 i / head_dim)``.

    Pair ``i`` of :func:`apply_rotary` (channels ``i`` and ``i + head_dim // 2``) turns by
    ``position * frequencies[i]`` radians. This is ``inv_freq`` of Hugging Face's LLaMA and
    GPT-NeoX (``base = max_timescale``).

    Args:
        head_dim: the size of each attention head, a positive even int.
        max_timescale: the base of the geometric sequence of wavelengths (RoPE's ``theta``).

    Returns:
        The frequencies, of shape ``(head_dim // 2,)`` and dtype float32, from 1 down.

    Raises:
        LayerConfigError: if ``head_dim`` is not a positive even int or ``max_timescale`` is
            not positive.

    Example:
        >>> import metoryx as mx
        >>> mx.rotary_frequencies(8, max_timescale=10000.0)
        Array([1.   , 0.1  , 0.01 , 0.001], dtype=float32)
    """
    name = "rotary_frequencies"
    _check_size(name, "head_dim", head_dim)
    check_timescale(name, max_timescale)
    return jnp.asarray(_frequencies(head_dim, max_timescale, np.dtype(np.float32)))


def apply_rotary(x: jax.Array, positions: jax.Array, max_timescale: float = 10000.0) -> jax.Array:
    """Rotary position embedding (RoPE): rotates pairs of channels of ``x`` by its positions.

    The **half-split** convention of GPT-NeoX and Hugging Face's LLaMA (``rotate_half``):
    channel ``i < h = head_dim // 2`` pairs with channel ``i + h``, and with
    ``a = position * rotary_frequencies(head_dim)[i]``::

        out[i]     = x[i] cos(a) - x[i + h] sin(a)
        out[i + h] = x[i + h] cos(a) + x[i] sin(a)

    i.e. ``x * cos + rotate_half(x) * sin``. (The original RoFormer and Meta's LLaMA code
    pair neighbours ``2i, 2i + 1`` instead: the same rotation of permuted channels, so their
    weights need their query/key projection rows permuted.) Rotations keep norms, position 0
    is the identity, and ``dot(apply_rotary(q, m), apply_rotary(k, n))`` depends on ``m - n``
    only: attention scores see relative positions. The rotation is computed in the dtype of
    ``x`` (integer ``x`` in the default floating dtype), from angles in float32.

    Args:
        x: queries or keys, of shape ``(*batch, seq, heads, head_dim)``, ``head_dim`` even.
        positions: the position of each sequence element (integers or floats), of a shape
            that broadcasts to ``(*batch, seq)`` without growing it: ``(seq,)`` for positions
            shared by the batch, ``(*batch, seq)`` for per-example positions (e.g. with
            padding, or an offset while decoding with a cache).
        max_timescale: the base of the frequencies (RoPE's ``theta``).

    Returns:
        The rotated array, of the shape of ``x`` and its (floating) dtype.

    Raises:
        LayerConfigError: if ``max_timescale`` is not positive.
        InputShapeError: if ``x`` has fewer than 3 axes or an odd last axis, or ``positions``
            does not broadcast to ``x.shape[:-2]``.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> q = jnp.linspace(-1.0, 1.0, 320).reshape(2, 5, 4, 8)  # (batch, seq, heads, dim)
        >>> rotated = mx.apply_rotary(q, jnp.arange(5))
        >>> rotated.shape
        (2, 5, 4, 8)
        >>> bool(jnp.allclose(rotated[:, 0], q[:, 0]))  # position 0 is not rotated
        True
    """
    name = "apply_rotary"
    check_timescale(name, max_timescale)
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim < 3 or x.shape[-1] % 2:
        raise errors.InputShapeError(
            f"{function_label(name)}: expected x of shape (*batch, seq, heads, head_dim) with an "
            f"even head_dim, got shape {x.shape}. Split the heads off the features first (e.g. "
            f"x.reshape(*x.shape[:-1], heads, head_dim)); rotary embeddings rotate pairs of "
            f"channels, so head_dim must be even."
        )
    lead = x.shape[:-2]
    if positions.ndim > len(lead) or any(
        p not in (1, n) for p, n in zip(positions.shape[::-1], lead[::-1], strict=False)
    ):
        raise errors.InputShapeError(
            f"{function_label(name)}: positions of shape {positions.shape} do not broadcast to the "
            f"(*batch, seq) axes {lead} of x (shape {x.shape}). Pass positions of shape "
            f"({lead[-1]},) shared by the batch, or one per example of shape {lead}."
        )
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    half = x.shape[-1] // 2
    angles = _angles(positions, x.shape[-1], max_timescale, x.dtype)
    # (*positions.shape, half) -> rank of x, with the heads axis: explicit, no rank promotion.
    angles = angles.reshape((1,) * (len(lead) - positions.ndim) + positions.shape + (1, half))
    cos, sin = cast(jnp.cos(angles), x.dtype), cast(jnp.sin(angles), x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _angles(positions: Any, features: int, max_timescale: float, dtype: Any) -> jax.Array:
    """``positions[..., None] * frequencies``: shape ``(*positions.shape, features // 2)``,
    in float32, or float64 when ``dtype`` is."""
    angle_dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    frequencies = _frequencies(features, max_timescale, angle_dtype)
    positions = jnp.asarray(positions).astype(angle_dtype)[..., None]
    return positions * frequencies.reshape((1,) * (positions.ndim - 1) + frequencies.shape)


def _frequencies(features: int, max_timescale: float, dtype: np.dtype) -> np.ndarray:
    """Computed in float64 by NumPy and rounded once: constants of the program, no work."""
    return (float(max_timescale) ** -(np.arange(0, features, 2) / features)).astype(dtype)


def _check_size(name: str, arg: str, value: Any) -> None:
    fix = f"Sin and cos, or the two channels rotated together, come in pairs: pass e.g. {arg}=64."
    if positive_int(name, arg, value, fix) % 2:
        raise errors.LayerConfigError(
            f"{name}: `{arg}` must be a positive even int, got {value!r}. {fix}"
        )
