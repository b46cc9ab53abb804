"""max_pool, min_pool, avg_pool: PyTorch parity (padding, strides, count_include_pad), batch
axes, the primitives traced, dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

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
# Averages computed by other programs (other shapes, jit or not, NumPy) sum in other orders and
# may cancel to near 0: compared within tests/_tolerance.py's bound for N roundings, at the
# scale of the values averaged. Maxima and copies are exact in any order.
N = 32
SCALE = float(np.abs(X).max())


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
    assert_close(averaged[0, 0, 0], X[0, :2, :2].mean(axis=(0, 1)), n=N, scale=SCALE)


@pytest.mark.parametrize("pool", [mx.max_pool, mx.avg_pool])
def test_any_number_of_batch_axes(pool):
    expected = pool(X, (2, 2), padding=1)
    assert_close(pool(X[0], (2, 2), padding=1), expected[0], n=N, scale=SCALE)
    stacked = pool(X.reshape(1, 2, 6, 5, 3), (2, 2), padding=1)
    assert_close(stacked, expected[None], n=N, scale=SCALE)


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
        # Found by tests/test_bad_arguments.py: sizes past int64 failed inside lax, and flags
        # took any truthy value.
        (dict(kernel_size=2**70), "past 2\\*\\*63 - 1"),
        (dict(kernel_size=(2, 2), strides=2**70), "past 2\\*\\*63 - 1"),
        (dict(kernel_size=(2, 2), padding=2**70), "below 2\\*\\*63"),
        (dict(kernel_size=(2, 2), count_include_pad="no"), "`count_include_pad` must be True"),
        (dict(kernel_size=(2, 2), count_include_pad=np.ones(2)), "True or False"),
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
    assert_close(grad, eager, n=N)  # sums of 1 / 9 (average) or copies of 1 (extrema)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


# adaptive_avg_pool and global_avg_pool: (PyTorch channels-first input shape, output size)
ADAPTIVE_CASES = {
    "1d-divisible": ((2, 3, 8), (4,)),
    "1d-overlapping": ((2, 3, 9), (4,)),
    "1d-larger-output": ((2, 3, 3), (5,)),
    "2d-divisible": ((2, 3, 6, 8), (3, 2)),
    "2d-mixed": ((2, 3, 7, 6), (3, 3)),
    "2d-overlapping": ((1, 2, 7, 5), (4, 3)),
    "3d-divisible": ((1, 2, 4, 4, 6), (2, 1, 3)),
    "3d-overlapping": ((1, 2, 5, 4, 7), (2, 3, 3)),
}


@pytest.mark.parametrize("case", ADAPTIVE_CASES)
def test_adaptive_avg_pool_matches_torch(torch, assert_matches_torch, case):
    shape, output_size = ADAPTIVE_CASES[case]
    theirs = getattr(torch.nn.functional, f"adaptive_avg_pool{len(output_size)}d")
    layout = _channels_last(len(output_size))
    assert_matches_torch(
        lambda x: mx.nn.pooling.adaptive_avg_pool(x, output_size),
        lambda x: theirs(x, output_size),
        [torch.randn(*shape)],
        layouts=[layout],
        out_layout=layout,
    )


def test_global_avg_pool_matches_torch(torch, assert_matches_torch):
    layout = _channels_last(2)
    assert_matches_torch(
        lambda x: mx.nn.pooling.global_avg_pool(x, 2, keepdims=True),
        torch.nn.AdaptiveAvgPool2d(1),
        [torch.randn(2, 3, 5, 4)],
        layouts=[layout],
        out_layout=layout,
    )


def test_global_avg_pool():
    from metoryx.nn.pooling import adaptive_avg_pool, global_avg_pool

    assert_close(global_avg_pool(X, 2), X.mean(axis=(1, 2)), n=N, scale=SCALE)
    assert_close(global_avg_pool(X, 1), X.mean(axis=2), n=N, scale=SCALE)
    kept = global_avg_pool(X, 2, keepdims=True)
    assert kept.shape == (2, 1, 1, 3)
    assert_close(kept, adaptive_avg_pool(X, (1, 1)), n=N, scale=SCALE)
    assert_close(global_avg_pool(X[0], 2), global_avg_pool(X, 2)[0], n=N, scale=SCALE)
    ints = jnp.arange(8, dtype=jnp.int32).reshape(2, 2, 2)
    assert global_avg_pool(ints, 1).dtype == jnp.float32
    np.testing.assert_array_equal(global_avg_pool(ints, 1), [[1.0, 2.0], [5.0, 6.0]])
    assert global_avg_pool(X.astype(jnp.bfloat16), 2).dtype == jnp.bfloat16


def test_adaptive_avg_pool_batch_axes_and_dtypes():
    # Compiled: one program per shape costs less than compiling each eager operation.
    adaptive_avg_pool = jax.jit(mx.nn.pooling.adaptive_avg_pool, static_argnums=1)
    expected = adaptive_avg_pool(X, (4, 3))
    assert expected.shape == (2, 4, 3, 3)
    assert_close(adaptive_avg_pool(X[0], (4, 3)), expected[0], n=N, scale=SCALE)
    assert_close(adaptive_avg_pool(X[None], (4, 3)), expected[None], n=N, scale=SCALE)
    # An int output size means one spatial axis: here the 5-long axis of 2 * 6 sequences.
    assert_close(adaptive_avg_pool(X, 1)[..., 0, :], X.mean(axis=2), n=N, scale=SCALE)
    np.testing.assert_array_equal(adaptive_avg_pool(X, (6, 5)), X)  # the identity
    assert adaptive_avg_pool(X.astype(jnp.bfloat16), (4, 3)).dtype == jnp.bfloat16
    ints = jnp.arange(5, dtype=jnp.int32).reshape(5, 1)
    pooled = adaptive_avg_pool(ints, 3)
    assert pooled.dtype == jnp.float32
    np.testing.assert_allclose(pooled[:, 0], [0.5, 2.0, 3.5])


def test_adaptive_avg_pool_program(jitted_equations, all_equations):
    from metoryx.nn.pooling import adaptive_avg_pool

    def primitives(fn, x):
        return [e.primitive.name for e in all_equations(jax.make_jaxpr(fn)(x).jaxpr)]

    def differentiated(fn):
        return jax.grad(lambda x: jnp.sum(fn(x) ** 2))

    # Every axis divisible: exactly avg_pool's program.
    assert jitted_equations(lambda x: adaptive_avg_pool(x, (3, 5)), X) == jitted_equations(
        lambda x: mx.avg_pool(x, (2, 1)), X
    )
    # Otherwise the overlapping axes are pooled by one contraction (a product per axis),
    # never a step per output cell; differentiated, up to MAX_SLICED_WINDOWS windows an axis,
    # by a slice and a sum per output index along each axis on its own (5 + 5 at 5 x 5, not
    # 5 x 5), above it by the contraction still.
    grid, long = jnp.ones((2, 32, 32, 3)), jnp.ones((2, 97, 3))
    for size, x, products in [((5, 5), grid, 2), (40, long, 1)]:
        forward = primitives(lambda x, size=size: adaptive_avg_pool(x, size), x)
        assert forward.count("dot_general") == products and "slice" not in forward
    sliced = primitives(differentiated(lambda x: adaptive_avg_pool(x, (5, 5))), grid)
    assert sliced.count("slice") == 10 and "dot_general" not in sliced
    large = primitives(differentiated(lambda x: adaptive_avg_pool(x, 40)), long)
    assert large.count("dot_general") == 2 and "slice" not in large  # forward, transposed
    mixed = primitives(lambda x: adaptive_avg_pool(x, (3, 4)), jnp.ones((2, 6, 7, 3)))
    assert mixed.count("reduce_window_sum") == 1 and mixed.count("dot_general") == 1


def _reference_adaptive_2d(x, output_size, cotangent):
    """PyTorch's bins written out cell by cell in NumPy: the pooled ``x`` and the gradient of
    ``sum(pooled * cotangent)`` with respect to ``x``."""
    x = np.asarray(x, np.float64)
    out, grad = np.zeros((x.shape[0], *output_size, x.shape[-1])), np.zeros(x.shape)
    for i in range(output_size[0]):
        a, b = i * x.shape[1] // output_size[0], -(-(i + 1) * x.shape[1] // output_size[0])
        for j in range(output_size[1]):
            c, d = j * x.shape[2] // output_size[1], -(-(j + 1) * x.shape[2] // output_size[1])
            out[:, i, j] = x[:, a:b, c:d].mean(axis=(1, 2))
            grad[:, a:b, c:d] += cotangent[:, i, j, None, None] / ((b - a) * (d - c))
    return out, grad


@pytest.mark.parametrize("output_size", [(3, 3), (4, 2), (5, 7)])
def test_adaptive_avg_pool_under_jit_matches_reference(output_size):
    # (3, 3): equal windows on the first axis, overlapping ones on the second; (5, 7): an
    # output larger than the input along the second axis.
    from metoryx.nn.pooling import adaptive_avg_pool

    cotangent = np.random.default_rng(1).standard_normal((2, *output_size, 3))
    out, grad = _reference_adaptive_2d(X, output_size, cotangent)
    pooled, vjp = jax.jit(jax.vjp, static_argnums=(0,))(
        lambda x: adaptive_avg_pool(x, output_size), X
    )
    assert_close(pooled, out, n=N, scale=SCALE)  # the differentiated form's value
    forward = jax.jit(adaptive_avg_pool, static_argnums=1)(X, output_size)  # the contraction
    assert_close(forward, out, n=N, scale=SCALE)
    grads = vjp(jnp.asarray(cotangent, jnp.float32))[0]
    assert_close(grads, grad, n=N, scale=float(np.abs(cotangent).max()))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.adaptive_avg_pool(X, (2, 0)), "positive int"),
        (lambda p: p.adaptive_avg_pool(X, "7"), "positive int"),
        (lambda p: p.adaptive_avg_pool(X, ()), "at least one spatial axis"),
        (lambda p: p.global_avg_pool(X, 0), "`num_spatial_axes` must be a positive int"),
        (lambda p: p.global_avg_pool(X, (1, 2)), "got \\(1, 2\\)"),
        (lambda p: p.global_avg_pool(X, True), "got True"),
        (lambda p: p.global_avg_pool(X, 2**70), "past 2\\*\\*63 - 1"),
        (lambda p: p.global_avg_pool(X, 2, keepdims=[]), "`keepdims` must be True or False"),
        (lambda p: p.adaptive_avg_pool(X, 2**70), "past 2\\*\\*63 - 1"),
    ],
)
def test_global_and_adaptive_bad_arguments(call, match):
    with pytest.raises(mx.errors.LayerConfigError, match=match):
        call(mx.nn.pooling)


class _Adaptive(mx.Module):
    def __call__(self, x):
        return mx.nn.pooling.adaptive_avg_pool(x, (2, 2))


class _Global(mx.Module):
    def __call__(self, x):
        return mx.nn.pooling.global_avg_pool(x, 3)


@pytest.mark.parametrize(
    "module, shape, expected",
    [
        (_Adaptive, (4, 4), ["adaptive_avg_pool in _Adaptive (root)", "len(output_size)=2"]),
        (_Adaptive, (2, 0, 5, 3), ["spatial axis 0", "is empty"]),
        (_Global, (4, 4, 4), ["global_avg_pool in _Global (root)", "num_spatial_axes=3"]),
    ],
)
def test_global_and_adaptive_bad_input_shape(module, shape, expected):
    _, apply_fn = mx.transform(module())
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn({}, None, jnp.ones(shape))
    for text in expected:
        assert text in str(info.value)
    assert "x[..., None]" in str(info.value) or "at least one element" in str(info.value)


def test_too_few_axes_for_many_spatial_axes_is_named_briefly():
    # The message once listed every axis: num_spatial_axes=2**62 ran out of memory building it.
    with pytest.raises(mx.errors.InputShapeError, match=r"\(\*batch, s1, \.\.\., s1000, ch"):
        mx.global_avg_pool(X, 1000)
