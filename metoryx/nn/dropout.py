"""dropout: randomly zero elements in training, scaling the kept ones to preserve the mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from metoryx import errors
from metoryx._core.rng import next_rng_key


def dropout(
    x: jax.Array, rate: float, is_training: bool, rng: jax.Array | None = None
) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest.

    In training, each element of ``x`` is kept with probability ``1 - rate`` and divided by
    ``1 - rate``, so the expected value of every element is unchanged and evaluation needs no
    rescaling. Out of training, or with ``rate == 0``, ``x`` is returned as it is and no key is
    drawn. ``rate == 1`` drops everything and returns zeros (as PyTorch and Flax do). The
    result keeps the dtype of ``x``.

    The key is ``rng`` if given, else ``mx.next_rng_key("dropout")``: a fresh key per call
    from the ``"dropout"`` stream of ``apply_fn``'s ``rngs``, derived from the ``"default"``
    stream when ``rngs`` has no ``"dropout"`` entry.

    Args:
        x: the input, of any shape; a floating dtype.
        rate: the probability of dropping an element, a Python float in ``[0, 1]``.
        is_training: whether to drop; False returns ``x``.
        rng: the key to draw the mask from; None draws one with ``mx.next_rng_key``.

    Returns:
        An array of the shape and dtype of ``x``.

    Raises:
        LayerConfigError: if ``rate`` is outside ``[0, 1]``.
        MissingRngError: in training with ``0 < rate``, no ``rng`` and no key in ``apply_fn``.
        ApplyContextError: in training with ``0 < rate``, no ``rng`` and called outside
            ``apply_fn``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> x = jnp.ones(8)
        >>> mx.dropout(x, 0.5, is_training=True, rng=jax.random.key(0))
        Array([0., 0., 2., 2., 0., 2., 2., 0.], dtype=float32)
        >>> mx.dropout(x, 0.5, is_training=False) is x
        True
    """
    if not 0.0 <= rate <= 1.0:
        raise errors.LayerConfigError(
            f"dropout: `rate` is the probability of dropping an element and must be in "
            f"[0, 1], got {rate!r}. For a keep probability p, pass rate=1 - p."
        )
    if not is_training or rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    key = next_rng_key("dropout") if rng is None else rng
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, jnp.shape(x))
    return lax.select(keep, x / keep_prob, jnp.zeros_like(x))
