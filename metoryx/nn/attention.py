"""Attention: the ``dot_product_attention`` function and the ``MultiHeadAttention`` layer, with
masks, causal attention, grouped-query attention, rotary embeddings (``RotaryEmbedding``) and a
key/value cache for autoregressive decoding.

Shapes are batch-first, then time, then heads: queries ``(*batch, T, heads,
head_dim)``, keys and values ``(*batch, S, kv_heads, head_dim)``, masks and biases broadcast to
``(*batch, heads, T, S)``, any number of leading batch axes.

**Causal alignment.** ``is_causal=True`` lets query ``i`` see key ``j`` when
``j <= i + causal_offset``. The default ``causal_offset=0`` is the *top-left* alignment of
PyTorch's ``scaled_dot_product_attention`` and of ``jax.nn.dot_product_attention`` (query 0 sees
key 0 only, whatever ``S``); ``causal_offset=S - T`` is the *bottom-right* alignment (the last
query sees every key), and a cache index is the offset of decoding, where the ``T`` new
queries sit at positions ``index, ..., index + T - 1`` of the cache.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, function_label, module_label
from metoryx._core.rng import key_argument
from metoryx._core.variables import State
from metoryx._docstrings import fill_docstring
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, fused, metoryx_only, same, transposed
from metoryx.nn._arguments import check_number, check_rate, check_timescale, positive_int
from metoryx.nn._compute import (
    DEFAULT_KERNEL_INIT,
    TRAINING_DOC,
    at_least_float32,
    cast,
    compute_dtype,
    layer_dtype,
    layer_training,
    mode_repr,
)
from metoryx.nn.attention_layout import AttentionLayout
from metoryx.nn.dropout import dropout
from metoryx.nn.linear import Dense
from metoryx.nn.positional import apply_rotary

_NAME = "dot_product_attention"
_RNG_FIX = "Or pass rng=None to draw one from the 'dropout' stream of apply_fn's rngs."


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    *,
    causal_offset: int | jax.Array = 0,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: jax.Array | None = None,
    dtype: Any = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention: ``softmax(q k^T * scale + bias, masked) v`` per head.

    Grouped-query attention when ``kv_heads < heads``: query head ``n`` attends with key/value
    head ``n // (heads // kv_heads)``, as PyTorch's ``enable_gqa=True`` (``kv_heads == 1`` is
    multi-query attention).

    ``implementation`` picks the code that computes it, all giving the same numbers within
    the dtype's rounding:

    - ``"einsum"``: written out with ``jnp.einsum`` as plain batched matrix products, the
      logits in the computation dtype (with float32 accumulation), the softmax in at least
      float32: bfloat16 and float16 logits are cast up for the softmax alone and its weights
      back down, so the score matrix is never held in float32 outside it (as Flax and
      PyTorch's math kernel do). The only one with dropout. On CPU it is the fastest (its
      gradient takes 0.7x the time of JAX's ``"xla"`` path at a small GPT's shapes).
    - ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (leading batch axes
      merged into one). It computes half-precision logits in float32.
    - ``"cudnn"``: JAX's cuDNN fused (flash) attention, for bfloat16 and float16 on NVIDIA
      GPUs; a call it cannot run raises ``LayerConfigError`` with JAX's reason.
    - ``None`` (the default): ``"cudnn"`` on a GPU for half-precision inputs without dropout
      where cuDNN can run the call, ``"einsum"`` otherwise. The backend is
      ``jax.default_backend()``.

    A query whose keys are all masked out gets the mean of all values (JAX's convention),
    not NaN as in PyTorch.

    Args:
        query: queries of shape ``(*batch, T, heads, head_dim)``, floating.
        key: keys of shape ``(*batch, S, kv_heads, head_dim)``, ``kv_heads`` dividing
            ``heads``.
        value: values of the shape of ``key``.
        mask: a boolean mask broadcastable to ``(*batch, heads, T, S)``, True where a query
            may attend to a key (PyTorch's boolean ``attn_mask`` convention; its
            ``key_padding_mask`` is the opposite: pass ``~key_padding_mask[:, None, None, :]``).
        bias: an additive bias of the logits, floating, broadcastable to
            ``(*batch, heads, T, S)`` (PyTorch's float ``attn_mask``; ALiBi).
        is_causal: whether query ``i`` sees only keys ``j <= i + causal_offset``.
        causal_offset: an int or a 0-d integer array (traced is fine), the position of the
            first query relative to the first key; see the module docstring. Only with
            ``is_causal``.
        scale: the factor of the logits; None for ``1 / sqrt(head_dim)``.
        dropout_rate: the probability of dropping each attention weight (the kept ones are
            divided by ``1 - dropout_rate``), as PyTorch's ``dropout_p``: applied whenever
            it is positive, so pass 0.0 at evaluation.
        rng: the dropout key; None draws one from the ``"dropout"`` stream with
            ``mx.next_rng_key``, as :func:`metoryx.dropout` does.
        dtype: the computation dtype (None: inferred from the inputs).
        implementation: None, ``"einsum"``, ``"xla"`` or ``"cudnn"``; see above.

    Returns:
        The attended values, of shape ``(*batch, T, heads, head_dim)`` and the computation
        dtype.

    Raises:
        InputShapeError: if the inputs' shapes do not fit together (the message names the
            calling layer, if any), or the mask, the bias or ``causal_offset`` has a shape
            that does not broadcast.
        InputDtypeError: if the query, key or value is not floating, the mask not boolean,
            the bias not floating or ``causal_offset`` not an integer (or any of the last
            three is no array at all).
        LayerConfigError: if ``dropout_rate`` is not a number in ``[0, 1]``, ``is_causal``
            not a bool, ``scale`` not None or a finite number, ``dtype`` not None or a numeric
            dtype, ``causal_offset`` is given without ``is_causal``, ``implementation`` is
            not one of the above, ``"xla"`` or ``"cudnn"`` is asked for with dropout, or
            ``"cudnn"`` cannot run the call.
        RngsTypeError: if ``rng`` is neither None nor one random key.
        MissingRngError: with ``0 < dropout_rate < 1``, no ``rng`` and no key in
            ``apply_fn``.

    Example:
        >>> import jax.numpy as jnp
        >>> import metoryx as mx
        >>> q = jnp.sin(jnp.arange(320.0)).reshape(2, 5, 4, 8)  # (batch, T, heads, head_dim)
        >>> kv = jnp.cos(jnp.arange(224.0)).reshape(2, 7, 2, 8)  # 2 key/value heads
        >>> mx.dot_product_attention(q, kv, kv).shape
        (2, 5, 4, 8)
        >>> out = mx.dot_product_attention(q, kv, kv, is_causal=True, causal_offset=2)
        >>> bool(jnp.allclose(out[:, -1], mx.dot_product_attention(q[:, -1:], kv, kv)[:, 0]))
        True
        >>> jax_own = mx.dot_product_attention(q, kv, kv, implementation="xla")
        >>> bool(jnp.allclose(jax_own, mx.dot_product_attention(q, kv, kv), atol=1e-6))
        True
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    lead, heads, t, s = _check_qkv(query, key, value)
    rate = check_rate(_NAME, "dropout_rate", dropout_rate)
    if not isinstance(is_causal, bool):  # the label walks the stack: error path only
        is_causal = bool_argument(function_label(_NAME), "is_causal", is_causal)
    if scale is not None:
        scale = check_number(
            _NAME,
            "scale",
            scale,
            fix="It multiplies the logits: pass a Python float, or None for 1 / sqrt(head_dim).",
        )
    if rng is not None:
        rng = key_argument(lambda: function_label(_NAME), "rng", rng, _RNG_FIX)
    given = layer_dtype(_NAME, dtype)
    if given is not None and not jnp.issubdtype(given, jnp.floating):
        raise errors.LayerConfigError(
            f"{_NAME}: `dtype` is the dtype it computes in and must be None (that of the "
            f"inputs) or a floating dtype, got {dtype!r:.60}. Pass e.g. dtype=jnp.bfloat16."
        )
    dtype = compute_dtype(given, query, key, value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise errors.InputDtypeError(
            f"{function_label(_NAME)}: expected a floating query, key and value, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}. Cast them, or pass "
            f"dtype=jnp.float32 to compute in floating point."
        )
    logits_dtype = np.dtype(dtype)
    if mask is not None:
        mask = _logits_shaped("mask", _as_array("mask", mask), lead, heads, t, s)
        if mask.dtype != jnp.bool_:
            raise errors.InputDtypeError(
                f"{function_label(_NAME)}: `mask` must be boolean (True where a query may "
                f"attend), got dtype {mask.dtype}. Pass an additive float mask as `bias`, or "
                f"a 0/1 mask as mask.astype(bool)."
            )
    if bias is not None:
        bias = _logits_shaped("bias", _as_array("bias", bias), lead, heads, t, s)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise errors.InputDtypeError(
                f"{function_label(_NAME)}: `bias` is added to the logits and must be floating, "
                f"got dtype {bias.dtype}. Pass a boolean mask as `mask`, or cast the bias."
            )
        bias = cast(bias, logits_dtype)
    offset = _check_offset(causal_offset, is_causal, t, s)
    if implementation is not None:  # the label walks the stack: error path only
        implementation = _check_implementation(lambda: function_label(_NAME), implementation, rate)
    chosen = _implementation(implementation, rate, dtype)
    merged = (-1,) if lead else (1,)
    q, k, v = (cast(a, dtype).reshape(merged + a.shape[len(lead) :]) for a in (query, key, value))
    out = None
    if chosen != "einsum":
        if is_causal and offset is not None:  # JAX's function knows top-left causal masks only
            mask = _with_causal(mask, t, s, offset)
            is_causal = False
        out = _jax_attention(chosen, implementation, q, k, v, bias, mask, scale, is_causal)
    if out is None:  # the einsums, or cuDNN chosen by default but unable to run this call
        if is_causal:
            mask = _with_causal(mask, t, s, 0 if offset is None else offset)
        out = _attention_einsum(q, k, v, bias, mask, scale, logits_dtype, rate, rng)
    return out.reshape(query.shape)


_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def _implementation(implementation: str | None, rate: float, dtype: np.dtype[Any]) -> str:
    """The implementation a call runs: the given one, or the default for the backend."""
    if implementation is not None:
        return implementation
    # cuDNN's fused kernels compute half-precision inputs only; JAX's "xla" path holds the
    # whole score matrix in float32 for them, and is slower than the einsums on CPU.
    if jax.default_backend() == "gpu" and dtype.itemsize == 2 and rate == 0.0:
        return "cudnn"
    return "einsum"


def _check_implementation(label: Callable[[], str], implementation: Any, rate: float) -> Any:
    """``implementation`` if it is None or one of the choices, and runs with ``rate``."""
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise errors.LayerConfigError(
            f"{label()}: `implementation` must be None (the fastest for the backend), "
            f"'einsum', 'xla' or 'cudnn', got {implementation!r:.60}."
        )
    if implementation not in (None, "einsum") and rate > 0.0:
        raise errors.LayerConfigError(
            f"{label()}: implementation={implementation!r} is jax.nn.dot_product_attention, "
            f"which has no dropout, but dropout_rate={rate}. Pass implementation='einsum' "
            f"(or None) for attention dropout."
        )
    return implementation


def _jax_attention(
    chosen: str,
    implementation: str | None,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    scale: float | None,
    is_causal: bool,
) -> jax.Array | None:
    """``jax.nn.dot_product_attention`` with ``chosen``; None where cuDNN, chosen by default,
    cannot run the call (no GPU with cuDNN, a head size or dtype it lacks)."""
    try:
        # JAX promotes bfloat16 to float32 logits implicitly, which strict promotion forbids.
        with jax.numpy_dtype_promotion("standard"):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                bias=bias,
                mask=mask,
                scale=scale,
                is_causal=is_causal,
                implementation=chosen,  # type: ignore[arg-type]
            )
    except (RuntimeError, ValueError, NotImplementedError) as e:
        if chosen != "cudnn":
            raise
        if implementation is None:
            return None
        raise errors.LayerConfigError(
            f"{function_label(_NAME)}: implementation='cudnn' cannot run this call: {e} "
            f"Pass implementation=None to use cuDNN where it can run and the einsums "
            f"elsewhere."
        ) from None


def _with_causal(mask: jax.Array | None, t: int, s: int, offset: jax.Array | int) -> jax.Array:
    causal = _causal_mask(t, s, offset)
    return causal if mask is None else jnp.logical_and(mask, causal)


def _check_qkv(
    query: jax.Array, key: jax.Array, value: jax.Array
) -> tuple[tuple[int, ...], int, int, int]:
    """``(batch shape, heads, T, S)`` of consistent inputs, else an InputShapeError."""

    def fail(problem: str, fix: str) -> errors.InputShapeError:
        return errors.InputShapeError(
            f"{function_label(_NAME)}: expected query (*batch, T, heads, head_dim) and key, "
            f"value (*batch, S, kv_heads, head_dim); {problem}. {fix}"
        )

    shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
    if min(query.ndim, key.ndim, value.ndim) < 3:
        raise fail(
            f"got {shapes}",
            "Split the heads off the features (x.reshape(*x.shape[:-1], heads, head_dim)); "
            "use heads=1 for single-head attention.",
        )
    if key.shape != value.shape:
        raise fail(
            f"key and value must have the same shape, got {shapes}",
            "Project the values to the keys' number of heads and head_dim.",
        )
    lead = query.shape[:-3]
    if key.shape[:-3] != lead:
        raise fail(
            f"the batch axes {lead} of the query differ from {key.shape[:-3]}, got {shapes}",
            "Give all three the same leading batch axes (broadcast them explicitly).",
        )
    t, heads, head_dim = query.shape[-3:]
    s, kv_heads, kv_dim = key.shape[-3:]
    if kv_dim != head_dim:
        raise fail(
            f"the query's head_dim {head_dim} differs from the key's {kv_dim}, got {shapes}",
            "Project queries and keys to the same head_dim.",
        )
    if heads % kv_heads:
        raise fail(
            f"kv_heads={kv_heads} does not divide heads={heads}, got {shapes}",
            "Each key/value head serves heads // kv_heads query heads: use a kv_heads that "
            "divides heads.",
        )
    return lead, heads, t, s


def _logits_shaped(
    name: str, x: Any, lead: tuple[int, ...], heads: int, t: int, s: int
) -> jax.Array:
    """A mask or bias broadcastable to ``(*lead, heads, T, S)`` as a 4-d ``(B, N, T', S')``
    array for ``jax.nn.dot_product_attention``: the batch axes merged (kept as 1 when all are
    broadcast), every other axis as given."""
    x = jnp.asarray(x)
    full = (*lead, heads, t, s)
    if x.ndim > len(full) or any(
        a not in (1, b) for a, b in zip(x.shape[::-1], full[::-1], strict=False)
    ):
        raise errors.InputShapeError(
            f"{function_label(_NAME)}: `{name}` of shape {x.shape} does not broadcast to "
            f"(*batch, heads, T, S) = {full}. Give each axis its size or 1, e.g. "
            f"{name}[..., None, :, :] to share it among the heads, or shape {(t, s)} for all."
        )
    x = x.reshape((1,) * (len(full) - x.ndim) + x.shape)
    batch, rest = x.shape[: len(lead)], x.shape[len(lead) :]
    if any(b != 1 for b in batch):
        x = jnp.broadcast_to(x, lead + rest)
        batch = (math.prod(lead),)
    else:
        batch = (1,)
    return x.reshape(batch + rest)


def _as_array(name: str, value: Any) -> jax.Array:
    """A mask, bias or offset as a JAX array; one that JAX cannot hold is an InputDtypeError."""
    if isinstance(value, jax.Array):
        return value
    if not isinstance(value, (str, bytes)):  # JAX parses some strings: "D" as a complex dtype
        try:
            return jnp.asarray(value)
        except (TypeError, ValueError, OverflowError):  # objects, ragged lists, huge ints
            pass
    raise errors.InputDtypeError(
        f"{function_label(_NAME)}: `{name}` must be an array (or a number), got "
        f"{type(value).__name__} {value!r:.60}. Pass a boolean mask as `mask`, a floating "
        f"bias as `bias` and an int (or a 0-d integer array) as `causal_offset`."
    )


def _check_offset(offset: Any, is_causal: bool, t: int, s: int) -> jax.Array | int | None:
    """The causal offset to build a mask with, or None for the plain top-left causal mask."""
    if isinstance(offset, int) and not isinstance(offset, bool):
        if offset != 0 and not is_causal:
            raise _offset_without_causal(offset)
        # Beyond [-T, S] the mask no longer changes (no key or every key is visible): clamped,
        # a huge Python int still fits the int32 positions.
        return None if offset == 0 else min(max(offset, -t), s)
    array = _as_array("causal_offset", offset)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise errors.InputDtypeError(
            f"{function_label(_NAME)}: `causal_offset` must be an int or an integer array, got "
            f"{offset!r}. Pass e.g. causal_offset=S - T for bottom-right alignment."
        )
    if array.ndim:
        raise errors.InputShapeError(
            f"{function_label(_NAME)}: `causal_offset` must be a single offset (0-d), got "
            f"shape {array.shape}. One offset is shared by the batch; give per-example "
            f"alignments as a boolean `mask` instead."
        )
    if not is_causal:
        raise _offset_without_causal(offset)
    return array


def _offset_without_causal(offset: Any) -> errors.LayerConfigError:
    return errors.LayerConfigError(
        f"{function_label(_NAME)}: causal_offset={offset!r} was given with is_causal=False, "
        f"where it has no effect. Pass is_causal=True for causal attention, or drop "
        f"causal_offset."
    )


def _causal_mask(t: int, s: int, offset: jax.Array | int) -> jax.Array:
    """``(1, 1, T, S)``: True where key ``j <= i + offset`` for query ``i``."""
    rows = lax.broadcasted_iota(jnp.int32, (t, s), 0) + offset
    return (lax.broadcasted_iota(jnp.int32, (t, s), 1) <= rows).reshape(1, 1, t, s)


def _attention_einsum(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    scale: float | None,
    logits_dtype: Any,
    rate: float,
    rng: jax.Array | None,
) -> jax.Array:
    """Attention written out with einsums on ``(B, T, N, H)`` inputs: logits in
    ``logits_dtype``, the softmax in at least float32, dropout on the weights when ``rate`` is
    positive.

    Everything stays four-dimensional, which XLA:CPU runs faster than the five-axis einsum
    ``"btkgh,bskh->bkgts"`` of ``jax.nn.dot_product_attention`` (whose gradient took 1.45x
    this one's at the GPT benchmark's shapes; a mere reshape of the logits to five axes costs
    1.3x): the logits are ``(B, K, G * T, S)``, the queries of a group (the ``G = N // K``
    query heads sharing a key/value head) stacked as rows, so both products are plain batched
    matrix products; with ``G == 1`` that is ``(B, N, T, S)`` and the queries are not
    transposed at all."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    group = n // kv_heads
    rows = q.reshape(b, t, kv_heads, group, h).transpose(0, 2, 3, 1, 4)
    logits = jnp.einsum(
        "bkrh,bskh->bkrs",
        rows.reshape(b, kv_heads, group * t, h),
        k,
        preferred_element_type=logits_dtype,
    )

    def as_rows(x: jax.Array) -> jax.Array:  # (B', N', T', S') -> broadcastable to the logits
        if group == 1 or x.shape[1:3] == (1, 1):
            return x
        heads = kv_heads if x.shape[1] == n else 1
        x = x.reshape(x.shape[0], heads, x.shape[1] // heads, *x.shape[2:])
        x = jnp.broadcast_to(x, (x.shape[0], heads, group, t, x.shape[-1]))
        return x.reshape(x.shape[0], heads, group * t, x.shape[-1])

    logits = logits * np.asarray(1.0 / math.sqrt(h) if scale is None else scale, logits_dtype)
    if bias is not None:
        logits = logits + as_rows(bias)
    if mask is not None:
        logits = jnp.where(as_rows(mask), logits, np.finfo(logits_dtype).min)
    weights = cast(jax.nn.softmax(cast(logits, at_least_float32(logits_dtype)), axis=-1), v.dtype)
    if rate > 0.0:
        weights = dropout(weights, rate, is_training=True, rng=rng)
    out = jnp.einsum("bkrs,bskh->bkrh", weights, v)
    out = out.reshape(b, kv_heads, group, t, v.shape[-1]).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, v.shape[-1])


class RotaryEmbedding(Module):
    """Rotary position embeddings (RoPE) for :class:`MultiHeadAttention`'s queries and keys.

    ``RotaryEmbedding()(x, positions)`` is :func:`metoryx.apply_rotary` (the half-split
    convention of GPT-NeoX and Hugging Face's LLaMA) applied to the first ``rotary_dim``
    channels of each head; the other channels pass unchanged (GPT-NeoX's ``rotary_pct``,
    GPT-J's ``rotary_dim``; the frequencies then follow ``rotary_dim``). The layer has no
    variables.

    Args:
        max_timescale: the base of the frequencies (RoPE's ``theta``; LLaMA 3 uses 500000.0).
        rotary_dim: how many leading channels of each head to rotate, a positive even int;
            None rotates all of them.

    Raises:
        LayerConfigError: if ``max_timescale`` is not positive or ``rotary_dim`` is not a
            positive even int.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> rotary = mx.RotaryEmbedding(max_timescale=10000.0, rotary_dim=4)  # of head_dim 8
        >>> layer = mx.MultiHeadAttention(4, 32, num_kv_heads=2, rotary=rotary)
        >>> init_fn, apply_fn = mx.transform(layer)
        >>> x = jnp.ones((2, 6, 32))
        >>> y, _ = apply_fn(init_fn(jax.random.key(0)), None, x, is_causal=True)
        >>> y.shape
        (2, 6, 32)
    """

    def __init__(self, max_timescale: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        check_timescale("RotaryEmbedding", max_timescale)
        if rotary_dim is not None and positive_int("RotaryEmbedding", "rotary_dim", rotary_dim) % 2:
            raise errors.LayerConfigError(
                f"RotaryEmbedding: `rotary_dim` must be even (channels rotate in pairs), got "
                f"{rotary_dim!r}. Pass e.g. rotary_dim={rotary_dim - 1}, or None for all."
            )
        self.max_timescale = float(max_timescale)
        self.rotary_dim = rotary_dim

    def extra_repr(self) -> str:
        return f"max_timescale={self.max_timescale}, rotary_dim={self.rotary_dim}"

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotates the queries or keys ``x`` by their positions.

        Args:
            x: queries or keys, of shape ``(*batch, seq, heads, head_dim)``.
            positions: positions of shape ``(seq,)`` or ``(*batch, seq)``.

        Returns:
            An array of the shape and (floating) dtype of ``x``.

        Raises:
            InputShapeError: if ``head_dim`` is shorter than ``rotary_dim`` or odd, or the
                positions do not fit ``x`` (from :func:`metoryx.apply_rotary`).
        """
        x = jnp.asarray(x)
        dim = self.rotary_dim
        if dim is None or (x.ndim and x.shape[-1] == dim):
            return apply_rotary(x, positions, self.max_timescale)
        if x.ndim == 0 or x.shape[-1] < dim:
            raise errors.InputShapeError(
                f"{module_label(self)}: rotary_dim={dim} channels of each head are rotated, "
                f"but the input of shape {x.shape} has head_dim "
                f"{x.shape[-1] if x.ndim else None}. Build the layer with a rotary_dim of at "
                f"most head_dim."
            )
        rotated = apply_rotary(x[..., :dim], positions, self.max_timescale)
        return jnp.concatenate([rotated, cast(x[..., dim:], rotated.dtype)], axis=-1)


@fill_docstring(training_attribute=TRAINING_DOC)
class MultiHeadAttention(Module):
    """Multi-head attention with masks, causal attention, grouped-query attention, rotary
    embeddings and a key/value cache, as ``torch.nn.MultiheadAttention(batch_first=True)``.

    The input ``query`` ``(*batch, T, in_size)`` is projected to ``num_heads`` heads of
    ``head_dim = qkv_size // num_heads`` features, the ``key`` and ``value`` inputs
    ``(*batch, S, key_size / value_size)`` to ``num_kv_heads`` heads each; every query head
    attends (:func:`dot_product_attention`) and the concatenated heads are projected to
    ``out_size``. ``qkv_size`` is the *total* size of the query projection, PyTorch's and
    Equinox's ``embed_dim``/``qkv_size`` (not the per-head size).

    Variables (with ``K = num_kv_heads * head_dim``):

    - ``params/query/kernel`` ``(in_size, qkv_size)``, ``params/query/bias`` ``(qkv_size,)``
    - ``params/key/kernel`` ``(key_size, K)``, ``params/key/bias`` ``(K,)``
    - ``params/value/kernel`` ``(value_size, K)``, ``params/value/bias`` ``(K,)``
    - ``params/out/kernel`` ``(qkv_size, out_size)``, ``params/out/bias`` ``(out_size,)``
    - after :meth:`init_cache`: ``cache/cached_key`` and ``cache/cached_value``
      ``(*batch_shape, max_length, num_kv_heads, head_dim)``, ``cache/cache_index`` ``()``
      int32.

    Query channel ``n * head_dim + d`` is channel ``d`` of head ``n``, as in PyTorch.

    **Decoding with a cache.** :meth:`init_cache` (definition world) adds the cache States;
    a call with ``decode=True`` writes the new keys and values at ``cache_index``, advances
    it by ``T``, and attends over the whole cache causally (query ``i`` of the call sees the
    slots up to ``cache_index + i``): token by token, or a prompt at once, then token by
    token, gives the full causal forward pass. Pass ``new_variables`` to the next call (the
    ``"cache"`` collection is mutable); restart with ``init_fn`` or by zeroing
    ``variables["cache"]``. One index is shared by the batch: for prompts of different
    lengths, pad them and mask the padded slots with ``mask``.

    **PyTorch.** :meth:`torch_conversions` maps ``torch.nn.MultiheadAttention``'s
    ``in_proj_weight``/``in_proj_bias`` (or ``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``) and ``out_proj``.
    Its ``bias_k``/``bias_v`` (``add_bias_kv=True``) and ``add_zero_attn`` have no
    counterpart here. ``torch_layout=AttentionLayout(...)`` reads the layouts of Hugging Face
    models instead: separate query/key/value/output ``Linear`` s (BERT, Llama, Mistral,
    grouped-query attention included) or GPT-2's fused ``c_attn``.

    Args:
        num_heads: the number of query heads.
        in_size: the feature size of the ``query`` input.
        qkv_size: the total projected size ``num_heads * head_dim``; None for ``in_size``.
        out_size: the output's feature size; None for ``in_size``.
        num_kv_heads: the number of key/value heads, dividing ``num_heads`` (grouped-query
            attention; 1 is multi-query attention); None for ``num_heads``.
        key_size: the feature size of the ``key`` input; None for ``in_size``.
        value_size: the feature size of the ``value`` input; None for ``key_size``.
        use_bias: whether the four projections add a learned bias.
        dropout_rate: the probability of dropping an attention weight in training.
        rotary: a :class:`RotaryEmbedding` to rotate queries and keys by their positions, or
            None.
        torch_layout: an :class:`AttentionLayout` naming the projections in a PyTorch
            ``state_dict`` (a Hugging Face model's); None for ``torch.nn.MultiheadAttention``'s.
        implementation: the code computing the attention, as in
            :func:`dot_product_attention`: None (the fastest for the backend), ``"einsum"``,
            ``"xla"`` or ``"cudnn"`` (the last two without dropout).
        kernel_init: initializer of the four kernels.
        bias_init: initializer of the four biases.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if a size is not a positive int, ``num_heads`` does not divide
            ``qkv_size``, ``num_kv_heads`` does not divide ``num_heads``, the rate is not in
            ``[0, 1]``, the rotary embedding does not fit ``head_dim``, or ``implementation``
            is not a choice of :func:`dot_product_attention` or runs no dropout.

    Attributes:
        query: the ``Dense`` projection of the queries (likewise ``key``, ``value``, ``out``).
        head_dim: the features per head, ``qkv_size // num_heads``.
        {training_attribute}

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> layer = mx.MultiHeadAttention(num_heads=4, in_size=32, num_kv_heads=2)
        >>> init_fn, apply_fn = mx.transform(layer)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["key"]["kernel"].shape  # 2 kv heads of head_dim 8
        (32, 16)
        >>> x = jnp.ones((2, 6, 32))
        >>> y, _ = apply_fn(variables, None, x, is_causal=True)
        >>> y.shape
        (2, 6, 32)
    """

    training: bool | None = None

    def __init__(
        self,
        num_heads: int,
        in_size: int,
        qkv_size: int | None = None,
        out_size: int | None = None,
        num_kv_heads: int | None = None,
        *,
        key_size: int | None = None,
        value_size: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        rotary: RotaryEmbedding | None = None,
        torch_layout: AttentionLayout | None = None,
        implementation: str | None = None,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        name = "MultiHeadAttention"
        size = functools.partial(positive_int, name)
        self.num_heads = size("num_heads", num_heads)
        self.in_size = size("in_size", in_size)
        self.qkv_size = self.in_size if qkv_size is None else size("qkv_size", qkv_size)
        self.out_size = self.in_size if out_size is None else size("out_size", out_size)
        self.num_kv_heads = (
            self.num_heads if num_kv_heads is None else size("num_kv_heads", num_kv_heads)
        )
        self.key_size = self.in_size if key_size is None else size("key_size", key_size)
        self.value_size = self.key_size if value_size is None else size("value_size", value_size)
        if self.qkv_size % self.num_heads:
            raise errors.LayerConfigError(
                f"{name}: qkv_size={self.qkv_size} is the total size of the heads and must be "
                f"a multiple of num_heads={self.num_heads}. Pass e.g. qkv_size="
                f"{self.num_heads * max(1, self.qkv_size // self.num_heads)}."
            )
        if self.num_heads % self.num_kv_heads:
            raise errors.LayerConfigError(
                f"{name}: num_kv_heads={self.num_kv_heads} must divide num_heads="
                f"{self.num_heads} (each key/value head serves a group of query heads). Pass "
                f"a divisor, e.g. num_kv_heads=1 for multi-query attention."
            )
        self.head_dim = self.qkv_size // self.num_heads
        if rotary is not None:
            _check_rotary(rotary, self.head_dim)
        self.dropout_rate = check_rate(name, "dropout_rate", dropout_rate)
        self.implementation = _check_implementation(lambda: name, implementation, self.dropout_rate)
        self.use_bias = bool_argument("MultiHeadAttention", "use_bias", use_bias)
        self.rotary = rotary
        if torch_layout is not None and not isinstance(torch_layout, AttentionLayout):
            raise errors.LayerConfigError(
                f"{name}: `torch_layout` must be an AttentionLayout or None, got "
                f"{torch_layout!r:.60}. Pass e.g. torch_layout=AttentionLayout(query='q_proj', "
                f"key='k_proj', value='v_proj', out='o_proj')."
            )
        self.torch_layout = torch_layout
        self.dtype = layer_dtype("MultiHeadAttention", dtype)
        self.param_dtype = param_dtype
        kv_size = self.num_kv_heads * self.head_dim
        dense = functools.partial(
            Dense,
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.query = dense(self.in_size, self.qkv_size)
        self.key = dense(self.key_size, kv_size)
        self.value = dense(self.value_size, kv_size)
        self.out = dense(self.qkv_size, self.out_size)
        # Mutable States, so module code assigns arrays to them: typed as what it reads.
        self.cached_key: jax.Array | None = None
        self.cached_value: jax.Array | None = None
        self.cache_index: jax.Array | None = None

    def extra_repr(self) -> str:
        parts = [f"num_heads={self.num_heads}", f"in_size={self.in_size}"]
        defaults = {
            "qkv_size": self.in_size,
            "out_size": self.in_size,
            "num_kv_heads": self.num_heads,
            "key_size": self.in_size,
            "value_size": self.key_size,
            "dropout_rate": 0.0,
            "implementation": None,
        }
        parts += [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        if self.cached_key is not None:
            *batch, length, _, _ = self.cached_key.shape
            parts.append(f"cache=(batch_shape={tuple(batch)}, max_length={length})")
        return mode_repr(self, ", ".join(parts))

    def init_cache(
        self, batch_shape: int | Sequence[int], max_length: int, dtype: Any = None
    ) -> None:
        """Adds the key/value cache for ``decode=True`` calls (definition world, before
        ``mx.transform``): States in the ``"cache"`` collection, zeros from ``init_fn``.

        Calling it again replaces the cache. To decode with a trained model, make a copy
        that holds the trained weights and give the copy a cache:
        ``decoder = mx.assign_variables(model, variables)``, then ``init_cache`` on its
        attention layers.

        Args:
            batch_shape: the leading batch axes of the inputs (an int for one axis, ``()``
                for unbatched inputs).
            max_length: the number of positions the cache holds.
            dtype: the dtype of the cached keys and values; None for ``dtype`` if given,
                else ``param_dtype``.

        Raises:
            LayerConfigError: if a size is not a positive int.

        Example:
            >>> import jax, jax.numpy as jnp, metoryx as mx
            >>> layer = mx.MultiHeadAttention(4, 32, num_kv_heads=2)
            >>> layer.init_cache(batch_shape=3, max_length=10)
            >>> init_fn, apply_fn = mx.transform(layer)
            >>> variables = init_fn(jax.random.key(0))
            >>> variables["cache"]["cached_key"].shape  # (batch, max_length, kv_heads, head_dim)
            (3, 10, 2, 8)
            >>> for token in jnp.ones((4, 3, 1, 32)):  # four steps of one token each
            ...     y, variables = apply_fn(variables, None, token, decode=True)
            >>> int(variables["cache"]["cache_index"]), y.shape
            (4, (3, 1, 32))
        """
        name = "MultiHeadAttention.init_cache"
        batch = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        batch = tuple(positive_int(name, "batch_shape", b) for b in batch)
        length = positive_int(name, "max_length", max_length)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (*batch, length, self.num_kv_heads, self.head_dim)
        self.cached_key = State("cache", initializers.zeros, shape, dtype)
        self.cached_value = State("cache", initializers.zeros, shape, dtype)
        self.cache_index = State("cache", initializers.zeros, (), jnp.int32)

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.MultiheadAttention(embed_dim=in_size, num_heads, kdim=key_size,
        vdim=value_size, bias=use_bias, batch_first=True)``'s ``state_dict`` layout, or that of
        ``torch_layout``.

        Raises:
            LayerConfigError: without ``torch_layout``, if the layer has no
                ``torch.nn.MultiheadAttention`` twin: grouped-query attention, or
                ``qkv_size``/``out_size`` other than ``in_size``. With a fused ``qkv``
                layout, if ``key_size`` or ``value_size`` differs from ``in_size``.
        """
        layout = self.torch_layout
        if layout is not None:
            if layout.qkv is not None and not self.key_size == self.value_size == self.in_size:
                raise errors.LayerConfigError(
                    f"{module_label(self)}: the fused projection {layout.qkv!r} has one input "
                    f"size for queries, keys and values, but this layer has in_size="
                    f"{self.in_size}, key_size={self.key_size}, value_size={self.value_size}. "
                    f"Use separate projections (AttentionLayout(query=..., key=..., value=...))."
                )
            kv_size = self.num_kv_heads * self.head_dim
            return layout.conversions(self.qkv_size, kv_size, self.use_bias) + self._cache_only()
        torch_sizes = {self.in_size, self.qkv_size, self.out_size}
        if self.num_kv_heads != self.num_heads or len(torch_sizes) > 1:
            raise errors.LayerConfigError(
                f"{module_label(self)}: torch.nn.MultiheadAttention has one size embed_dim "
                f"for the query input, the projections and the output, and as many key/value "
                f"heads as query heads; this layer has in_size={self.in_size}, qkv_size="
                f"{self.qkv_size}, out_size={self.out_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}. For a Hugging Face model's separate "
                f"projections, pass torch_layout=AttentionLayout(query=..., key=..., "
                f"value=..., out=...)."
            )
        names = ("query", "key", "value")
        sizes = (self.in_size,) * 3
        if self.key_size == self.value_size == self.in_size:
            kernels = [fused("in_proj_weight", [f"{n}/kernel" for n in names], sizes, True)]
        else:
            kernels = [transposed(f"{n[0]}_proj_weight", f"{n}/kernel", (1, 0)) for n in names]
        result = [*kernels, transposed("out_proj.weight", "out/kernel", (1, 0))]
        if self.use_bias:
            result += [
                fused("in_proj_bias", [f"{n}/bias" for n in names], sizes, False),
                same("out_proj.bias", "out/bias"),
            ]
        return result + self._cache_only()

    def _cache_only(self) -> list[TorchConversion]:
        """The decoding cache, which has no PyTorch entry: a loaded model starts it empty."""
        if self.cached_key is None:
            return []
        return [
            metoryx_only(name, np.zeros(state.shape, state.dtype))
            for name, state in [
                ("cached_key", self.cached_key),
                ("cached_value", self.cached_value),
                ("cache_index", self.cache_index),
            ]
        ]

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array | None = None,
        value: jax.Array | None = None,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        *,
        positions: jax.Array | None = None,
        key_positions: jax.Array | None = None,
        decode: bool = False,
        is_training: bool = False,
    ) -> jax.Array:
        """Attends from ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Args:
            query: ``(*batch, T, in_size)``.
            key: ``(*batch, S, key_size)``; None for ``query`` (self-attention).
            value: ``(*batch, S, value_size)``; None for ``key``.
            mask: boolean, broadcastable to ``(*batch, num_heads, T, S)``, True where a query
                may attend (with ``decode``, ``S`` is the cache's ``max_length``). PyTorch's
                ``key_padding_mask`` ``(batch, S)`` (True = ignore) is
                ``~key_padding_mask[:, None, None, :]``.
            bias: floating, broadcastable to ``(*batch, num_heads, T, S)``, added to the
                logits.
            is_causal: whether query ``i`` sees only keys ``j <= i`` (top-left aligned, as
                PyTorch). Implied by ``decode``.
            positions: the rotary positions of the queries, ``(T,)`` or ``(*batch, T)``; None
                for ``0, ..., T - 1``, after ``cache_index`` with ``decode``.
            key_positions: the rotary positions of the keys; None for ``positions`` when the
                keys are the queries' tokens (``key`` omitted, or ``decode``), else
                ``0, ..., S - 1``.
            decode: whether to write the keys and values into the cache at ``cache_index``
                and attend over the cache (see the class docstring).
            is_training: whether to apply attention dropout (when ``dropout_rate > 0``). A
                ``training`` switch that is set decides instead.

        Returns:
            The output, ``(*batch, T, out_size)`` in the computation dtype.

        Raises:
            InputShapeError: if the inputs' shapes do not fit the layer or each other, the
                mask or bias does not broadcast, a concrete ``cache_index + T`` exceeds the
                cache's ``max_length``, or the batch axes differ from the cache's. Under
                ``jit`` the index is not known: an overflowing call writes its keys into the
                cache's last ``T`` slots (``lax.dynamic_update_slice`` clamps) and returns
                NaN, so that the overflow cannot pass unnoticed.
            InputDtypeError: if the mask is not boolean or the bias not floating.
            LayerConfigError: with ``decode`` and no cache (:meth:`init_cache`), or with
                ``positions`` and no ``rotary``.
            MissingRngError: in training with ``dropout_rate > 0`` and no key.
        """
        query = jnp.asarray(query)
        self_attention = key is None
        key = query if key is None else jnp.asarray(key)
        value = key if value is None else jnp.asarray(value)
        self._check_inputs(query, key, value)
        if self.rotary is None and (positions is not None or key_positions is not None):
            raise errors.LayerConfigError(
                f"{module_label(self)}: positions were given, but the layer has no rotary "
                f"embedding to use them. Build it with rotary=RotaryEmbedding(), or add "
                f"position information to the inputs (e.g. mx.sinusoidal_embedding)."
            )
        overflow = self._check_cache(query, key) if decode else None
        lead, t = query.shape[:-2], query.shape[-2]
        q = self._heads(self.query, query, self.num_heads)
        k = self._heads(self.key, key, self.num_kv_heads)
        v = self._heads(self.value, value, self.num_kv_heads)
        index = self._cache()[2] if decode else 0
        if self.rotary is not None:
            if positions is None:
                positions = jnp.arange(t) + index if decode else jnp.arange(t)
            if key_positions is None:
                own = self_attention or decode
                key_positions = positions if own else jnp.arange(key.shape[-2])
            q, k = self.rotary(q, positions), self.rotary(k, key_positions)
        if decode:
            k, v = self._write_cache(k, v)
            is_causal = True
        attended = dot_product_attention(
            q,
            k,
            v,
            mask,
            bias,
            is_causal,
            causal_offset=index,
            dropout_rate=self.dropout_rate if layer_training(self, is_training) else 0.0,
            dtype=self.dtype,
            implementation=self.implementation,
        )
        if overflow is not None:
            attended = jnp.where(overflow, np.asarray(np.nan, attended.dtype), attended)
        return self.out(attended.reshape(*lead, t, self.qkv_size))

    def _heads(self, projection: Module, x: jax.Array, heads: int) -> jax.Array:
        """``(*batch, L, heads, head_dim)``: a Dense splits its output itself (faster), any
        other module (a replacement, a LoRA wrapper) has its output reshaped."""
        if isinstance(projection, Dense):
            return projection(x, heads=heads)
        return projection(x).reshape(*x.shape[:-1], heads, self.head_dim)

    def _check_inputs(self, query: jax.Array, key: jax.Array, value: jax.Array) -> None:
        shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
        if min(query.ndim, key.ndim, value.ndim) < 2:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected inputs of shape (*batch, length, features), "
                f"got {shapes}. Add the sequence axis (x[..., None, :] for one element)."
            )
        if key.shape[:-1] != value.shape[:-1] or key.shape[:-2] != query.shape[:-2]:
            raise errors.InputShapeError(
                f"{module_label(self)}: the key and value must have the same leading axes "
                f"(*batch, S) and the query the same batch axes, got {shapes}. Give inputs "
                f"with matching batch axes and as many values as keys."
            )

    def _check_cache(self, query: jax.Array, key: jax.Array) -> jax.Array | None:
        """Checks a decoding call before any work; returns None, or under ``jit`` (where
        ``cache_index`` is not known) a traced flag of an overflow."""
        cached_key, _, index = self._cache()
        *batch, length, _, _ = cached_key.shape
        t = query.shape[-2]
        if key.shape[-2] != t or query.shape[:-2] != tuple(batch):
            raise errors.InputShapeError(
                f"{module_label(self)}: decode=True appends new tokens to a cache of batch axes "
                f"{tuple(batch)}, so the inputs must have those batch axes and the same number "
                f"T of tokens in query, key and value; got query {query.shape}, key "
                f"{key.shape}. Give inputs of the cache's batch shape, or call init_cache "
                f"with the batch shape of the inputs."
            )
        try:
            filled = operator.index(index)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            return index + t > length
        if filled + t > length:
            raise errors.InputShapeError(
                f"{module_label(self)}: the cache holds {length} positions and {filled} are "
                f"filled, too few for {t} more. Call init_cache with a larger max_length, or "
                f"start a new sequence from zeroed variables['cache']."
            )
        return None

    def _cache(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The cached keys, values and index; an error if ``init_cache`` was never called."""
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise errors.LayerConfigError(
                f"{module_label(self)}: decode=True needs a key/value cache, and this layer has "
                f"none. Call layer.init_cache(batch_shape, max_length) in the definition world, "
                f"before mx.transform, and pass the resulting variables (with their 'cache' "
                f"collection) to apply_fn."
            )
        return self.cached_key, self.cached_value, self.cache_index

    def _write_cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The caches with ``k``, ``v`` written at ``cache_index``; the States updated."""
        cached_key, cached_value, index = self._cache()
        start = (0,) * (cached_key.ndim - 3) + (index, 0, 0)
        cached_key = lax.dynamic_update_slice(cached_key, cast(k, cached_key.dtype), start)
        cached_value = lax.dynamic_update_slice(cached_value, cast(v, cached_value.dtype), start)
        self.cached_key, self.cached_value = cached_key, cached_value
        self.cache_index = index + k.shape[-3]
        return cached_key, cached_value


def _check_rotary(rotary: Any, head_dim: int) -> None:
    if not isinstance(rotary, RotaryEmbedding):
        raise errors.LayerConfigError(
            f"MultiHeadAttention: `rotary` must be a RotaryEmbedding or None, got {rotary!r}. "
            f"Pass e.g. rotary=RotaryEmbedding(max_timescale=10000.0)."
        )
    dim = head_dim if rotary.rotary_dim is None else rotary.rotary_dim
    if dim > head_dim or dim % 2:
        raise errors.LayerConfigError(
            f"MultiHeadAttention: the rotary embedding rotates {dim} channels per head in "
            f"pairs, but head_dim=qkv_size // num_heads={head_dim}. Use an even head_dim, or "
            f"RotaryEmbedding(rotary_dim=...) with an even rotary_dim of at most head_dim."
        )
