"""Random keys: path-derived init keys and the named streams of ``apply_fn``.

Init keys come from the root key and a 64-bit BLAKE2b hash of the variable's path, folded in as
two 32-bit words. The hash does not depend on ``PYTHONHASHSEED``, the process or the order of the
other variables, so editing one layer never moves another layer's start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from metoryx import errors
from metoryx._core.context import Frame, innermost_frame
from metoryx._core.module import calling_module_label
from metoryx._core.typed import Tracer, jit, jnp_asarray, lax_broadcast, lax_fori_loop

DEFAULT_STREAM = "default"


def path_hash(path: Iterable[str]) -> tuple[int, int]:
    """The stable 64-bit hash of a path, as two 32-bit words."""
    digest = hashlib.blake2b("/".join(path).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def fold_in_path(key: jax.Array, path: Iterable[str]) -> jax.Array:
    """``key`` folded with the 64-bit hash of ``path``: the key of one variable or stream."""
    high, low = path_hash(path)
    if isinstance(key, Tracer):  # traced: the two plain equations a user would write
        return jax.random.fold_in(jax.random.fold_in(key, high), low)
    return _fold_in_twice_jitted(key, np.uint32(high), np.uint32(low))


def fold_in_paths(key: jax.Array, words: np.ndarray) -> jax.Array:
    """The keys of many paths at once, stacked: ``words`` holds their ``path_hash`` rows.

    Row ``i`` of the result is ``fold_in_path(key, path_i)``, bit for bit: fold_in is integer
    arithmetic, the same batched or not, in a loop or not.
    """
    high, low = words[:, 0], words[:, 1]
    if isinstance(key, Tracer):
        return _fold_in_rows(key, high, low)
    return _fold_in_rows_jitted(key, high, low)


def path_words(paths: Iterable[Iterable[str]]) -> np.ndarray:
    """The ``path_hash`` of each path, as a ``uint32[n, 2]`` array for ``fold_in_paths``."""
    return np.array([path_hash(p) for p in paths], dtype=np.uint32).reshape(-1, 2)


def _fold_in_twice(key: jax.Array, high: ArrayLike, low: ArrayLike) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, high), low)


def _fold_in_rows(key: jax.Array, high: ArrayLike, low: ArrayLike) -> jax.Array:
    # The two fold_ins as two turns of a loop: one threefry hash for XLA to compile (each is
    # ~0.2 s on CPU), not two.
    words = jnp.stack([jnp_asarray(high, np.uint32), jnp_asarray(low, np.uint32)])
    keys = lax_broadcast(key, (words.shape[1],))

    def fold(i: Any, keys: jax.Array) -> jax.Array:
        return jax.vmap(jax.random.fold_in)(keys, words[i])

    return lax_fori_loop(0, 2, fold, keys)


# Eagerly, one compiled program for every path (the words are arguments, not constants): one
# dispatch of ~60 us per variable instead of two fold_ins at ~700 us, so init of a 1,000-layer
# model spends its time drawing, not deriving keys. The batched one is compiled once per count.
_fold_in_twice_jitted = jit(_fold_in_twice)
_fold_in_rows_jitted = jit(_fold_in_rows)


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed key or a legacy ``uint32[2]``/``uint32[4]`` key."""
    dtype = _array_dtype(x)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == np.uint32 and jnp.ndim(x) == 1 and jnp.shape(x)[0] in (2, 4)


def key_batch_shape(x: Any) -> tuple[int, ...]:
    """The leading shape of a batch of keys (``jax.random.split(key, 4)`` -> ``(4,)``); ``()``
    for one key or anything that is no key array."""
    dtype = _array_dtype(x)
    if dtype is None:
        return ()
    shape = tuple(jnp.shape(x))
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return shape
    if dtype == np.uint32 and len(shape) > 1 and shape[-1] in (2, 4):
        return shape[:-1]
    return ()


def _array_dtype(x: Any) -> Any:
    """The dtype of an array (a traced one included), None for anything else: a scalar type
    such as ``np.float32`` has a ``dtype`` attribute that is no dtype."""
    if isinstance(x, (jax.Array, np.ndarray)):
        return cast(Any, x).dtype  # np.ndarray[Unknown] narrowed from Any: the cast says Any
    return None


def key_argument(label: Callable[[], str], name: str, value: Any, fix: str) -> jax.Array:
    """``value`` if it is one random key (typed, or a legacy ``uint32[2]``/``uint32[4]``), else
    an RngsTypeError naming the function (``label()``, called on the error path only) and the
    argument ``name``, ending with ``fix``.

    Example:
        >>> import jax
        >>> from metoryx._core.rng import key_argument
        >>> key = jax.random.key(0)
        >>> key_argument(lambda: "dropout", "rng", key, "Pass rng=None.") is key
        True
    """
    batch = key_batch_shape(value)
    if not batch and is_key(value):
        return cast(jax.Array, value)
    given = f"a batch of keys of shape {batch}" if batch else _describe(value)
    raise errors.RngsTypeError(
        f"{label()}: `{name}` must be one random key, such as jax.random.key(0) (or a legacy "
        f"jax.random.PRNGKey(0)); got {given}. {fix}"
    )


def as_root_key(key: Any) -> jax.Array:
    """Check the key given to ``init_fn``; an int seed becomes ``jax.random.key(seed)``."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        seed = cast("int | np.integer[Any]", key)  # isinstance says np.integer[Unknown]
        if not -(2**63) <= int(seed) < 2**63:
            raise errors.RngsTypeError(
                f"init_fn: an int seed must fit in 64 bits, got {int(seed)}. Pass a smaller "
                f"seed or a key, e.g. init_fn(jax.random.key(0))."
            )
        return jax.random.key(int(seed))
    batch = key_batch_shape(key)
    if batch:
        raise errors.RngsTypeError(
            f"init_fn takes one key, got a batch of keys of shape {batch} ({_describe(key)}). "
            f"To make one set of variables per key (an ensemble), map it: "
            f"jax.vmap(init_fn)(keys)."
        )
    if not is_key(key):
        raise errors.RngsTypeError(
            f"init_fn expects a random key, e.g. init_fn(jax.random.key(0)) or an int seed; "
            f"got {_describe(key)}."
        )
    return cast(jax.Array, key)


def parse_rngs(rngs: Any) -> dict[str, Any]:
    """``None``, a key, or a dict of named keys -> ``{stream: key}``."""
    if rngs is None:
        return {}
    # isinstance narrows an Any to a Mapping of Unknown names and keys: the casts say Any.
    given = (
        cast("Mapping[Any, Any]", rngs).items() if isinstance(rngs, Mapping) else (("rngs", rngs),)
    )
    batched = [(name, shape) for name, k in given if (shape := key_batch_shape(k))]
    if batched:
        raise errors.RngsTypeError(
            f"apply_fn takes one key per stream, got a batch of keys: "
            f"{', '.join(f'{n!r} of shape {s}' for n, s in batched)}. To run once per key, map "
            f"it: jax.vmap(apply_fn, in_axes=(None, 0, ...)), or split the batch and pass one."
        )
    if isinstance(rngs, Mapping):
        streams = cast("Mapping[Any, Any]", rngs)
        bad = [f"{name!r}: {_describe(k)}" for name, k in streams.items() if not is_key(k)]
        if bad or not all(isinstance(name, str) for name in streams):
            raise errors.RngsTypeError(
                f"rngs must map stream names (str) to keys; these entries are not: "
                f"{', '.join(bad) or 'non-str names'}. Build it with "
                f"mx.PRNGKeys(jax.random.key(0), dropout=jax.random.key(1))."
            )
        return dict(streams)
    if is_key(rngs):
        return {DEFAULT_STREAM: rngs}
    raise errors.RngsTypeError(
        f"apply_fn's `rngs` must be None, a key (jax.random.key(0) or a legacy "
        f"jax.random.PRNGKey(0)) or a dict of named keys (mx.PRNGKeys(key, dropout=key2)); "
        f"got {_describe(rngs)}."
    )


def PRNGKeys(default: Any = None, **streams: Any) -> dict[str, Any]:  # noqa: N802 (a constructor)
    """Named random streams for ``apply_fn``: ``{"default": default, **streams}``.

    A layer that asks for a stream that is not given draws from a stream derived from
    ``default`` (so one key is enough for dropout); give a stream its own key to control it
    separately.

    Args:
        default: the key of the ``"default"`` stream, or ``None`` for none.
        **streams: keys of named streams, e.g. ``dropout=jax.random.key(1)``.

    Returns:
        A plain dict (a PyTree that ``jax.jit`` and ``vmap`` see through).

    Example:
        >>> import jax, metoryx as mx
        >>> rngs = mx.PRNGKeys(jax.random.key(0), dropout=jax.random.key(1))
        >>> sorted(rngs)
        ['default', 'dropout']
    """
    keys = dict(streams)
    if default is not None:
        keys[DEFAULT_STREAM] = default
    parse_rngs(keys)
    return keys


def next_rng_key(stream: str | None = None) -> jax.Array:
    """A fresh random key from a named stream of the running ``apply_fn``.

    Each call returns a different key (the stream's key folded with a call counter), the same
    ones on every run with the same ``rngs``. A stream not given to ``apply_fn`` is derived from
    the ``"default"`` stream.

    Args:
        stream: the stream name, e.g. ``"dropout"``; ``None`` means ``"default"``.

    Returns:
        A key of the same kind (typed or legacy) as the one given to ``apply_fn``.

    Raises:
        ApplyContextError: when called outside ``apply_fn``.
        MissingRngError: when ``apply_fn`` got no key for the stream, naming the calling layer.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Noise(mx.Module):
        ...     def __call__(self, x):
        ...         return x + jax.random.normal(mx.next_rng_key("noise"), x.shape)
        >>> _, apply_fn = mx.transform(Noise())
        >>> y, _ = apply_fn({}, jax.random.key(0), jnp.zeros(3))
        >>> y.shape
        (3,)
    """
    name = DEFAULT_STREAM if stream is None else stream
    found = innermost_frame()
    if found is None:
        raise errors.ApplyContextError(
            f"mx.next_rng_key({name!r}) was called outside apply_fn. Random keys exist only "
            f"while a transformed model runs; outside, use jax.random directly."
        )
    frame = found[1]
    frame.check_trace(
        lambda: f"mx.next_rng_key({name!r}) is called by {calling_module_label() or 'code'}"
    )
    base = stream_base(frame, name)
    count = frame.counters.get(name, 0)
    frame.counters[name] = count + 1
    return jax.random.fold_in(base, count)


def stream_base(frame: Frame, name: str, cache: bool = True) -> jax.Array:
    """The key that the draws of stream ``name`` in ``frame`` fold their counter into.

    In a top-level frame: the given key, or one derived from the ``"default"`` stream. In the
    child frame of a lifted body: the parent's, or, where the body splits the stream, the key
    the parent would draw next folded with the copy's index. Only a frame's own base is
    cached there: a parent's, computed while the body is traced, belongs to the body's trace.
    """
    base = frame.derived.get(name)
    if base is not None:
        return base
    region = frame.region
    if region is None:
        base = frame.streams.get(name)
        if base is None:
            default = frame.streams.get(DEFAULT_STREAM)
            if default is None:
                raise _missing(name, frame.streams)
            base = fold_in_path(default, ("stream", name))
    else:
        base = stream_base(region.parent, name, cache=False)
        if region.splits(name):
            base = jax.random.fold_in(base, region.start.get(name, 0))
            base = jax.random.fold_in(base, frame.index)
            region.split_used.add(name)
    if cache:
        frame.derived[name] = base
    return base


def _missing(stream: str, given: Mapping[str, Any]) -> errors.MissingRngError:
    where = calling_module_label() or "module code"
    have = f"streams {sorted(given)}" if given else "rngs=None"
    return errors.MissingRngError(
        f"{where} needs a random key from stream {stream!r}, but apply_fn got {have} and no "
        f"'default' key to derive it from. Pass a key: apply_fn(variables, jax.random.key(0), "
        f"...), or name the stream: mx.PRNGKeys(key, {stream}=key2). For evaluation, turn the "
        f"randomness off instead (e.g. is_training=False)."
    )


def _describe(x: Any) -> str:
    dtype = _array_dtype(x)
    if dtype is None:
        return f"{type(x).__name__} {x!r:.60}"
    return f"{type(x).__name__} of dtype {dtype} and shape {jnp.shape(x)}"
