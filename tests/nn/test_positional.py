"""sinusoidal_embedding, rotary_frequencies and apply_rotary: NumPy references of the formulas,
the properties of rotations (norms, relative positions, position 0), broadcasting of positions,
jit, grad, dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.nn.positional import apply_rotary, rotary_frequencies, sinusoidal_embedding

RNG = np.random.default_rng(0)


def _reference_table(positions, features, max_timescale=10000.0, interleaved=False):
    """The formula of "Attention Is All You Need", in float64: PE(p, 2i) = sin(p / T^(2i/d)),
    PE(p, 2i + 1) = cos(p / T^(2i/d)); [sin | cos] halves unless ``interleaved``."""
    i = np.arange(features // 2)
    angles = np.asarray(positions, np.float64)[..., None] / max_timescale ** (2 * i / features)
    if interleaved:
        return np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(*angles.shape[:-1], -1)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def _reference_rotary(x, positions, max_timescale=10000.0):
    """Hugging Face LLaMA's ``x * cos + rotate_half(x) * sin`` in NumPy float64, positions of
    shape ``(seq,)`` or ``(batch, seq)``."""
    x = np.asarray(x, np.float64)
    dim = x.shape[-1]
    inv_freq = 1.0 / max_timescale ** (np.arange(0, dim, 2) / dim)
    freqs = np.asarray(positions, np.float64)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)[..., None, :]  # the heads axis
    rotate_half = np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


@pytest.mark.parametrize(
    "positions",
    [np.arange(7), np.array(3), RNG.integers(0, 500, (2, 3)), RNG.uniform(-5, 2000, (4,))],
    ids=["arange", "scalar", "2d-ints", "floats"],
)
def test_sinusoidal_matches_formula(positions):
    table = sinusoidal_embedding(jnp.asarray(positions, jnp.float32), 16)
    assert table.shape == (*np.shape(positions), 16) and table.dtype == jnp.float32
    np.testing.assert_allclose(table, _reference_table(positions, 16), atol=2e-4)


def test_sinusoidal_layout_and_options():
    positions = np.arange(50)
    table = sinusoidal_embedding(jnp.arange(50), 8, max_timescale=100.0)
    np.testing.assert_allclose(table, _reference_table(positions, 8, 100.0), atol=1e-5)
    # The conversion to the paper's interleaved layout given in the docstring.
    interleaved = table.reshape(50, 2, 4).swapaxes(-1, -2).reshape(50, 8)
    np.testing.assert_allclose(
        interleaved, _reference_table(positions, 8, 100.0, interleaved=True), atol=1e-5
    )
    np.testing.assert_array_equal(
        sinusoidal_embedding(jnp.arange(50, dtype=jnp.int32), 8, 100.0), table
    )
    low = sinusoidal_embedding(jnp.arange(50), 8, 100.0, dtype=jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), table, atol=1e-2)


def test_float64_angles():
    positions = np.array([0, 1, 12345, 987654])
    with jax.enable_x64(True):
        table = sinusoidal_embedding(jnp.asarray(positions), 8, dtype=jnp.float64)
        x = jnp.asarray(RNG.standard_normal((4, 1, 8)))
        rotated = apply_rotary(x, jnp.asarray(positions))
        assert table.dtype == rotated.dtype == jnp.float64
        np.testing.assert_allclose(table, _reference_table(positions, 8), atol=1e-9)
        np.testing.assert_allclose(rotated, _reference_rotary(x, positions), atol=1e-9)


def test_sinusoidal_under_jit():
    positions = jnp.arange(6).reshape(2, 3)
    jitted = jax.jit(sinusoidal_embedding, static_argnums=1)(positions, 4)
    # sin and cos compiled into one kernel or run alone may round their last bit apart.
    assert_close(jitted, sinusoidal_embedding(positions, 4), n=2)


def test_rotary_frequencies():
    frequencies = rotary_frequencies(16, max_timescale=500000.0)
    assert frequencies.shape == (8,) and frequencies.dtype == jnp.float32
    expected = 500000.0 ** -(np.arange(0, 16, 2) / 16)
    # exp(a) of a float32 a carries a's rounding (|a| * eps) as a relative error: per element.
    assert_close(frequencies, expected, scale=expected * (1 + np.abs(np.log(expected))))


X = jnp.asarray(RNG.standard_normal((2, 6, 3, 8)), jnp.float32)  # (batch, seq, heads, dim)


@pytest.mark.parametrize(
    "positions",
    [np.arange(6), RNG.integers(0, 1000, (2, 6)), RNG.uniform(0, 100, (1, 6))],
    ids=["shared", "per-example", "floats-broadcast-batch"],
)
def test_apply_rotary_matches_rotate_half_reference(positions):
    ours = apply_rotary(X, jnp.asarray(positions, jnp.float32))
    assert ours.shape == X.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _reference_rotary(X, positions), atol=2e-4)


def test_apply_rotary_max_timescale_and_batch_axes():
    positions = RNG.integers(0, 50, (2, 6))
    ours = apply_rotary(X, jnp.asarray(positions), max_timescale=50.0)
    np.testing.assert_allclose(ours, _reference_rotary(X, positions, 50.0), atol=1e-5)
    # No batch axis, and two batch axes: other shapes, other kernels for the same rotation
    # (x * cos - y * sin), whose multiply-adds XLA may fuse apart.
    assert_close(apply_rotary(X[0], jnp.asarray(positions[0]), 50.0), ours[0], n=4)
    stacked = apply_rotary(X[None], jnp.asarray(positions[None]), 50.0)
    assert_close(stacked, ours[None], n=4)


def test_rotary_preserves_norms():
    rotated = apply_rotary(X, jnp.asarray(RNG.uniform(0, 10000, (2, 6)), jnp.float32))
    np.testing.assert_allclose(
        jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(X, axis=-1), rtol=1e-5
    )


def test_rotary_position_zero_is_identity():
    np.testing.assert_array_equal(apply_rotary(X, jnp.zeros(6, jnp.int32)), X)


def test_rotary_scores_depend_on_relative_positions_only():
    # 64 random (m, n, shift) triples: <R_m q, R_n k> == <R_{m+s} q, R_{n+s} k>.
    q = jnp.asarray(RNG.standard_normal((64, 1, 16)), jnp.float32)  # (samples as seq, heads, dim)
    k = jnp.asarray(RNG.standard_normal((64, 1, 16)), jnp.float32)
    m, n, shift = (jnp.asarray(RNG.integers(0, 200, 64)) for _ in range(3))

    def scores(m, n):
        return jnp.sum(apply_rotary(q, m) * apply_rotary(k, n), axis=-1)

    np.testing.assert_allclose(scores(m, n), scores(m + shift, n + shift), atol=1e-4)
    np.testing.assert_allclose(scores(m - n, jnp.zeros_like(n)), scores(m, n), atol=1e-4)
    # ...and they do change with the offset m - n.
    assert float(jnp.abs(scores(m, n + 1) - scores(m, n)).max()) > 1e-2


def test_apply_rotary_jit_grad_and_dtypes():
    positions = jnp.arange(6)
    rotated = apply_rotary(X, positions)
    assert_close(jax.jit(apply_rotary)(X, positions), rotated, n=8)  # angles up to 5 rad
    # The gradient of a rotation is the inverse rotation of the cotangent.
    grad = jax.jit(jax.grad(lambda x: (apply_rotary(x, positions) ** 3).sum()))(X)
    np.testing.assert_allclose(grad, apply_rotary(3 * rotated**2, -positions), atol=1e-4)
    low = jax.jit(apply_rotary)(X.astype(jnp.bfloat16), positions)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), rotated, atol=5e-2)
    assert jax.eval_shape(apply_rotary, jnp.ones((2, 1, 4), jnp.int32), positions[:2]).dtype == (
        jnp.float32
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sinusoidal_embedding(jnp.arange(3), 7), "`features` must be a positive even"),
        (lambda: sinusoidal_embedding(jnp.arange(3), 0), "got 0"),
        (lambda: sinusoidal_embedding(jnp.arange(3), True), "got True"),
        (lambda: sinusoidal_embedding(jnp.arange(3), 4, max_timescale=0.0), "finite number > 0"),
        (lambda: rotary_frequencies(5), "`head_dim` must be a positive even int"),
        (lambda: rotary_frequencies(8, max_timescale=-1), "got -1"),
        (lambda: apply_rotary(X, jnp.arange(6), max_timescale="big"), "max_timescale"),
        # Found by tests/test_bad_arguments.py: a dtype went to jnp.dtype unchecked (None
        # meant float64), and sizes past 2**63 - 1 failed inside NumPy.
        (lambda: sinusoidal_embedding(jnp.arange(3), 4, dtype="zeros"), "floating dtype"),
        (lambda: sinusoidal_embedding(jnp.arange(3), 4, dtype=None), "got None"),
        (lambda: sinusoidal_embedding(jnp.arange(3), 4, dtype=jnp.int32), "floating dtype"),
        (lambda: sinusoidal_embedding(jnp.arange(3), 2**70), "past 2\\*\\*63 - 1"),
        (lambda: rotary_frequencies(2**70), "past 2\\*\\*63 - 1"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(mx.errors.LayerConfigError, match=match):
        call()


class _Attention(mx.Module):
    def __call__(self, x, positions):
        return apply_rotary(x, positions)


@pytest.mark.parametrize(
    "x_shape, positions_shape, expected",
    [
        ((6, 8), (6,), ["(*batch, seq, heads, head_dim)", "got shape (6, 8)"]),
        ((6, 3, 7), (6,), ["even head_dim", "(6, 3, 7)"]),
        ((2, 6, 3, 8), (5,), ["(5,)", "(2, 6)", "of shape (6,)"]),
        ((6, 3, 8), (2, 6), ["(2, 6)", "do not broadcast"]),
    ],
)
def test_bad_input_shapes(x_shape, positions_shape, expected):
    _, apply_fn = mx.transform(_Attention())
    x, positions = jnp.ones(x_shape), jnp.zeros(positions_shape, jnp.int32)
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn({}, None, x, positions)
    assert str(info.value).startswith("apply_rotary in _Attention (root)")
    for text in expected:
        assert text in str(info.value)
    with pytest.raises(mx.errors.InputShapeError, match="^apply_rotary: "):
        apply_rotary(x, positions)
