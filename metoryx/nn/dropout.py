"""dropout and Dropout: randomly zero elements in training, scaling the kept ones to preserve
the mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from metoryx._core.module import Module, function_label
from metoryx._core.rng import key_argument, next_rng_key
from metoryx._docstrings import fill_docstring
from metoryx.nn._arguments import check_rate
from metoryx.nn._compute import TRAINING_DOC, layer_training, mode_repr, training_flag

_RNG_FIX = "Or pass rng=None to draw one from the 'dropout' stream of apply_fn's rngs."


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
        LayerConfigError: if ``rate`` is not a number in ``[0, 1]``.
        RngsTypeError: if ``rng`` is neither None nor one random key.
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
    check_rate("dropout", "rate", rate)
    if rng is not None:
        rng = key_argument(lambda: function_label("dropout"), "rng", rng, _RNG_FIX)
    if not training_flag(is_training, lambda: function_label("dropout")) or rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    key = next_rng_key("dropout") if rng is None else rng
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, jnp.shape(x))
    return lax.select(keep, x / keep_prob, jnp.zeros_like(x))


@fill_docstring(training_attribute=TRAINING_DOC)
class Dropout(Module):
    """The :func:`~metoryx.dropout` function as a layer, with its rate fixed at construction.

    ``Dropout(rate)(x, is_training)`` is ``dropout(x, rate, is_training)``: in training each
    element is zeroed with probability ``rate`` and the kept ones are divided by ``1 - rate``;
    out of training ``x`` is returned unchanged. The key comes from the ``"dropout"`` stream of
    ``apply_fn``'s ``rngs`` (derived from the ``"default"`` stream when there is no
    ``"dropout"`` entry). The layer has no variables.

    Args:
        rate: the probability of dropping an element, a Python number in ``[0, 1]``.

    Raises:
        LayerConfigError: if ``rate`` is not a number in ``[0, 1]``.

    Attributes:
        {training_attribute}

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> _, apply_fn = mx.transform(mx.Dropout(0.5))
        >>> x = jnp.ones(8)
        >>> y, _ = apply_fn({}, jax.random.key(0), x, is_training=True)
        >>> sorted(set(y.tolist()))
        [0.0, 2.0]
        >>> apply_fn({}, None, x, is_training=False)[0] is x
        True
    """

    training: bool | None = None

    def __init__(self, rate: float):
        super().__init__()
        self.rate = check_rate("Dropout", "rate", rate)

    def extra_repr(self) -> str:
        return mode_repr(self, f"rate={self.rate}")

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """Applies dropout.

        Args:
            x: the input, of any shape; a floating dtype.
            is_training: whether to drop; False returns ``x``. A ``training`` switch that
                is set decides instead.

        Returns:
            An array of the shape and dtype of ``x``.

        Raises:
            MissingRngError: in training with ``0 < rate`` and no key in ``apply_fn``.
        """
        return dropout(x, self.rate, layer_training(self, is_training))
