"""dropout and Dropout: statistics, keys (explicit, per call, per stream, missing), evaluation,
dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx.nn.dropout import Dropout


class _Twice(mx.Module):
    """Two dropouts in one call: each must draw its own key."""

    def __call__(self, x, is_training):
        return mx.dropout(x, 0.5, is_training), mx.dropout(x, 0.5, is_training)


_, apply_twice = mx.transform(_Twice())
apply_twice = jax.jit(apply_twice, static_argnames="is_training")
# One shape throughout: each new shape compiles the random bit generator again.
X = jnp.ones(4096)


def test_statistics():
    y = mx.dropout(X, 0.3, is_training=True, rng=jax.random.key(0))
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.7) < 0.03  # the standard deviation is 0.007
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    assert abs(float(y.mean()) - 1.0) < 0.05


def test_same_key_same_mask_other_key_other_mask():
    first = mx.dropout(X, 0.5, True, rng=jax.random.key(0))
    np.testing.assert_array_equal(first, mx.dropout(X, 0.5, True, rng=jax.random.key(0)))
    assert not np.array_equal(first, mx.dropout(X, 0.5, True, rng=jax.random.key(1)))


def test_identity_out_of_training_or_at_rate_zero():
    x = jnp.arange(4.0)
    assert mx.dropout(x, 0.5, is_training=False) is x  # no key needed either
    assert mx.dropout(x, 0.0, is_training=True) is x


def test_rate_one_drops_everything():
    y = mx.dropout(jnp.ones(5), 1.0, is_training=True)
    np.testing.assert_array_equal(y, np.zeros(5))


def test_keys_from_apply_fn():
    x = X
    (a, b), _ = apply_twice({}, jax.random.key(0), x, is_training=True)
    assert not np.array_equal(a, b)  # a fresh key per call
    (a2, b2), _ = apply_twice({}, jax.random.key(0), x, is_training=True)
    np.testing.assert_array_equal(a, a2)  # the same rngs give the same masks
    np.testing.assert_array_equal(b, b2)
    (c, _), _ = apply_twice({}, jax.random.key(1), x, is_training=True)
    assert not np.array_equal(a, c)
    # A "dropout" stream is used when given, instead of one derived from "default".
    (d, _), _ = apply_twice(
        {}, mx.PRNGKeys(jax.random.key(0), dropout=jax.random.key(5)), x, is_training=True
    )
    assert not np.array_equal(a, d)
    (e, _), _ = apply_twice({}, {"dropout": jax.random.key(5)}, x, is_training=True)
    np.testing.assert_array_equal(d, e)


def test_missing_key():
    with pytest.raises(mx.errors.MissingRngError) as info:
        apply_twice({}, None, jnp.ones(4), is_training=True)
    assert "dropout" in str(info.value) and "_Twice" in str(info.value)
    (y, _), _ = apply_twice({}, None, jnp.ones(4), is_training=False)  # evaluation needs none
    np.testing.assert_array_equal(y, np.ones(4))


def test_outside_apply_without_key():
    with pytest.raises(mx.errors.ApplyContextError, match="apply_fn"):
        mx.dropout(jnp.ones(4), 0.5, is_training=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_keeps_dtype(dtype):
    y = mx.dropout(X.astype(dtype), 0.5, True, rng=jax.random.key(0))
    assert y.dtype == dtype
    assert set(np.asarray(y, np.float32).tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_bad_rate(rate):
    with pytest.raises(mx.errors.LayerConfigError) as info:
        mx.dropout(jnp.ones(4), rate, is_training=True)
    assert "[0, 1]" in str(info.value) and repr(rate) in str(info.value)
    assert "rate=1 - p" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The Dropout module


class _Function(mx.Module):
    def __call__(self, x, is_training):
        return mx.dropout(x, 0.5, is_training)


def test_module_equals_function():
    _, apply_module = mx.transform(Dropout(0.5))
    _, apply_function = mx.transform(_Function())
    y, variables = apply_module({}, jax.random.key(0), X, is_training=True)
    assert variables == {}
    np.testing.assert_array_equal(y, apply_function({}, jax.random.key(0), X, True)[0])
    assert set(np.asarray(y).tolist()) == {0.0, 2.0}
    x = jnp.arange(4.0)
    assert apply_module({}, None, x, is_training=False)[0] is x


def test_module_missing_key():
    class Net(mx.Module):
        def __init__(self):
            self.drop = Dropout(0.5)

        def __call__(self, x):
            return self.drop(x, is_training=True)

    with pytest.raises(mx.errors.MissingRngError) as info:
        mx.transform(Net()).apply({}, None, jnp.ones(4))
    assert "dropout" in str(info.value) and "Dropout at 'drop'" in str(info.value)


def test_module_rate_edges():
    x = jnp.ones(4)
    np.testing.assert_array_equal(
        mx.transform(Dropout(1)).apply({}, None, x, is_training=True)[0], np.zeros(4)
    )
    assert mx.transform(Dropout(0)).apply({}, None, x, is_training=True)[0] is x
    assert Dropout(1).rate == 1.0 and isinstance(Dropout(1).rate, float)
    assert Dropout(0.25).extra_repr() == "rate=0.25"


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_module_bad_rate(rate):
    with pytest.raises(mx.errors.LayerConfigError) as info:
        Dropout(rate)
    message = str(info.value)
    assert message.startswith("Dropout: `rate`") and "[0, 1]" in message
    assert repr(rate) in message and "rate=1 - p" in message


def test_function_rejects_a_rate_that_is_not_a_number():
    with pytest.raises(mx.errors.LayerConfigError, match=r"^dropout: `rate`.*'0\.5'"):
        mx.dropout(jnp.ones(4), "0.5", is_training=True)


@pytest.mark.parametrize(
    "rng, given",
    [
        (0, "got int 0"),
        ("key", "got str 'key'"),
        (np.ones(2), "dtype float64"),
        (jax.random.split(jax.random.key(0), 3), "a batch of keys of shape (3,)"),
    ],
)
def test_function_rejects_an_rng_that_is_not_one_key(rng, given):
    # Found by tests/test_bad_arguments.py: the value reached jax.random unchecked.
    with pytest.raises(mx.errors.RngsTypeError) as info:
        mx.dropout(jnp.ones(4), 0.5, is_training=True, rng=rng)
    message = str(info.value)
    assert message.startswith("dropout: `rng` must be one random key") and given in message
    assert "rng=None" in message
    legacy = jax.random.PRNGKey(0)
    assert mx.dropout(jnp.ones(4), 0.5, is_training=True, rng=legacy).shape == (4,)
