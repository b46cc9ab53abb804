"""max_pool, min_pool, avg_pool: PyTorch parity (padding, strides, count_include_pad), batch
axes, the primitives traced, dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx


def _channels_last(ndim):
    return (0, *range(2, ndim + 2), 1)


# (PyTorch channels-first input shape, our call, PyTorch call)
CASES = {
    "max-1d": (
        (2, 3, 9),
        lambda x: mx.max_pool(x, 3, strides=2, padding=1),
        lambda F, x: F.max_pool1d(x, 3, stride=2, padding=1),
    ),
    "max-2d": (
        (2, 3, 6, 7),
        lambda x: mx.max_pool(x, (2, 3)),
        lambda F, x: F.max_pool2d(x, (2, 3)),
    ),
    "max-2d-padding": (
        (2, 3, 5, 5),
        lambda x: mx.max_pool(x, (3, 3), strides=(2, 1), padding=1),
        lambda F, x: F.max_pool2d(x, 3, stride=(2, 1), padding=1),
    ),
    "max-3d": (
        (1, 2, 4, 5, 4),
        lambda x: mx.max_pool(x, (2, 2, 2), strides=1),
        lambda F, x: F.max_pool3d(x, 2, stride=1),
    ),
    "avg-1d": ((2, 3, 8), lambda x: mx.avg_pool(x, 2), lambda F, x: F.avg_pool1d(x, 2)),
    "avg-2d-include-pad": (
        (2, 3, 5, 6),
        lambda x: mx.avg_pool(x, (3, 3), strides=2, padding=1),
        lambda F, x: F.avg_pool2d(x, 3, stride=2, padding=1),
    ),
    "avg-2d-exclude-pad": (
        (2, 3, 5, 6),
        lambda x: mx.avg_pool(x, (3, 2), strides=(2, 1), padding=(1, 1), count_include_pad=False),
        lambda F, x: F.avg_pool2d(x, (3, 2), stride=(2, 1), padding=1, count_include_pad=False),
    ),
    "avg-3d-exclude-pad": (
        (1, 2, 4, 3, 5),
        lambda x: mx.avg_pool(x, (3, 3, 3), strides=(1, 2, 2), padding=1, count_include_pad=False),
        lambda F, x: F.avg_pool3d(x, 3, stride=(1, 2, 2), padding=1, count_include_pad=False),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch(torch, assert_matches_torch, case):
    shape, ours, theirs = CASES[case]
    layout = _channels_last(len(shape) - 2)
    assert_matches_torch(
        ours,
        lambda x: theirs(torch.nn.functional, x),
        [torch.randn(*shape)],
        layouts=[layout],
        out_layout=layout,
    )


def test_asymmetric_padding_matches_torch(torch, assert_matches_torch):
    F = torch.nn.functional
    assert_matches_torch(
        lambda x: mx.max_pool(x, (2, 2), padding=((0, 1), (1, 0))),
        lambda x: F.max_pool2d(F.pad(x, (1, 0, 0, 1), value=-float("inf")), 2),
        [torch.randn(2, 3, 5, 5)],
        layouts=[_channels_last(2)],
        out_layout=_channels_last(2),
    )


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5, 3)), jnp.float32)


def test_min_pool_is_negated_max_pool():
    np.testing.assert_array_equal(
        mx.min_pool(X, (3, 2), strides=1, padding="SAME"),
        -mx.max_pool(-X, (3, 2), strides=1, padding="SAME"),
    )


def test_strides_default_to_kernel_size():
    for pool in (mx.max_pool, mx.min_pool, mx.avg_pool):
        np.testing.assert_array_equal(pool(X, (2, 2)), pool(X, (2, 2), strides=(2, 2)))
    assert mx.max_pool(X, (2, 2)).shape == (2, 3, 2, 3)


def test_same_padding_keeps_ceil_of_size_over_stride():
    assert mx.max_pool(X, (3, 3), strides=2, padding="SAME").shape == (2, 3, 3, 3)
    averaged = mx.avg_pool(X, (3, 3), strides=1, padding="same", count_include_pad=False)
    assert averaged.shape == X.shape
    np.testing.assert_allclose(averaged[0, 0, 0], X[0, :2, :2].mean(axis=(0, 1)), rtol=1e-6)


@pytest.mark.parametrize("pool", [mx.max_pool, mx.avg_pool])
def test_any_number_of_batch_axes(pool):
    expected = pool(X, (2, 2), padding=1)
    np.testing.assert_array_equal(pool(X[0], (2, 2), padding=1), expected[0])
    stacked = pool(X.reshape(1, 2, 6, 5, 3), (2, 2), padding=1)
    np.testing.assert_array_equal(stacked, expected[None])


def test_traces_one_specialized_reduction():
    def primitives(fn):
        return [e.primitive.name for e in jax.make_jaxpr(fn)(X).jaxpr.eqns]

    assert primitives(lambda x: mx.max_pool(x, (2, 2))) == ["reduce_window_max"]
    assert primitives(lambda x: mx.min_pool(x, (2, 2))) == ["reduce_window_min"]
    assert primitives(lambda x: mx.avg_pool(x, (2, 2))) == ["reduce_window_sum", "div"]
    grad = jax.make_jaxpr(jax.grad(lambda x: mx.max_pool(x, (2, 2)).sum()))(X)
    assert "select_and_scatter_add" in [e.primitive.name for e in grad.jaxpr.eqns]


def test_dtypes():
    x16 = X.astype(jnp.bfloat16)
    assert mx.max_pool(x16, (2, 2), padding=1).dtype == jnp.bfloat16
    assert mx.avg_pool(x16, (2, 2), padding=1, count_include_pad=False).dtype == jnp.bfloat16
    ints = jnp.arange(16, dtype=jnp.int32).reshape(4, 4, 1)
    maxed = mx.max_pool(ints, (2, 2), padding=1)
    assert maxed.dtype == jnp.int32 and int(maxed[0, 0, 0]) == 0  # padding never wins
    assert mx.avg_pool(ints, (2, 2)).dtype == jnp.float32
    np.testing.assert_allclose(mx.avg_pool(ints, (2, 2))[..., 0], [[2.5, 4.5], [10.5, 12.5]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=(2, 0)), "positive int"),
        (dict(kernel_size=(2, 2), strides=(1, 1, 1)), "2 ints"),
        (dict(kernel_size=(2, 2), padding="FULL"), "`padding` must be"),
        (dict(kernel_size=(2, 2), padding=-1), "non-negative"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(mx.errors.LayerConfigError, match=match) as info:
        mx.avg_pool(X, **kwargs)
    assert str(info.value).startswith("avg_pool")


class _Net(mx.Module):
    def __call__(self, x):
        return mx.max_pool(x, (3, 3))


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((4, 4), ["2 spatial axes", "(4, 4)", "x[..., None]"]),
        ((2, 2, 5, 3), ["spatial axis 0", "size 2", "extent 3"]),
    ],
)
def test_bad_input_shape(shape, expected):
    _, apply_fn = mx.transform(_Net())
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn({}, None, jnp.ones(shape))
    assert str(info.value).startswith("max_pool in _Net (root)")
    for text in expected:
        assert text in str(info.value)
    with pytest.raises(mx.errors.InputShapeError, match="^max_pool: "):
        mx.max_pool(jnp.ones(shape), (3, 3))


@pytest.mark.parametrize(
    "pool",
    [
        lambda x: mx.max_pool(x, (2, 2), padding="SAME"),
        lambda x: mx.min_pool(x, (2, 2), padding=1),
        lambda x: mx.avg_pool(x, (3, 3), strides=(1, 1), padding=1, count_include_pad=False),
    ],
)
def test_every_pool_is_differentiable_under_jit(pool):
    # jit traces the reduction's start value: it must stay a constant for JAX's gradient rule.
    grad = jax.jit(jax.grad(lambda x: pool(x).sum()))(X)
    eager = jax.grad(lambda x: pool(x).sum())(X)
    np.testing.assert_allclose(grad, eager, rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
