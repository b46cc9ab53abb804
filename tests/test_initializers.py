"""Tests of metoryx/initializers.py.

Statistical checks draw half a million values from fixed keys and allow five standard errors
or more, so they are deterministic on one JAX version and still hold across versions (JAX 0.12
scales normals differently, which moves the last bits).

Compiling is what costs time here: each new shape compiles the sampler again, and XLA takes
seconds on shapes with several small dims (a (2, 3, 3, 8, 16) kernel: 6 s of CPU, against 0.4 s
for the same 2304 values drawn flat). So the tests share a few shapes, mostly 2-d, and compute
their statistics in NumPy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

from metoryx import errors, initializers

KEY = jax.random.key(0)
DENSE = (64, 128)  # (in, out); PyTorch's weight is (128, 64)
SHAPE = DENSE  # for the tests that run every initializer
BIG = (512, 1024)  # 524288 values
TRUNCATED_STD = 0.87962566103423978  # std of a standard normal cut to (-2, 2)

# One row per public initializer: the generic tests below run on all of them.
CATALOGUE = {
    "zeros": initializers.zeros,
    "ones": initializers.ones,
    "constant": initializers.constant(0.5),
    "normal": initializers.normal(),
    "truncated_normal": initializers.truncated_normal(),
    "uniform": initializers.uniform(),
    "variance_scaling": initializers.variance_scaling(1.0, "fan_avg", "truncated_normal"),
    "glorot_uniform": initializers.glorot_uniform(),
    "glorot_normal": initializers.glorot_normal(),
    "lecun_uniform": initializers.lecun_uniform(),
    "lecun_normal": initializers.lecun_normal(),
    "he_uniform": initializers.he_uniform(),
    "he_normal": initializers.he_normal(),
    "orthogonal": initializers.orthogonal(),
}
ALIASES = {
    "xavier_uniform": "glorot_uniform",
    "xavier_normal": "glorot_normal",
    "kaiming_uniform": "he_uniform",
    "kaiming_normal": "he_normal",
}
NAMED = {  # name: (scale, mode, distribution); the normals are untruncated, as in PyTorch
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_normal": (1.0, "fan_avg", "normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "normal"),
}
RANDOM = [name for name in CATALOGUE if name not in ("zeros", "ones", "constant")]


def _np(x: jax.Array) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _max_abs(x: jax.Array) -> float:
    return float(np.abs(_np(x)).max())


def test_catalogue_covers_the_public_names():
    public = set(initializers.__all__) - {"Initializer", "get"}
    assert public == set(CATALOGUE) | set(ALIASES)


@pytest.mark.parametrize("name", initializers.NAMES)
def test_get_gives_the_initializer_of_each_name_with_its_defaults(name):
    made = initializers.get(name)
    factory = getattr(initializers, name)
    expected = factory if name in ("zeros", "ones") else factory()
    np.testing.assert_array_equal(made(KEY, SHAPE), expected(KEY, SHAPE))
    assert initializers.get(made) is made


def test_get_lists_the_names_for_an_unknown_one_and_refuses_non_callables():
    with pytest.raises(errors.VariableDefinitionError, match="Did you mean 'he_normal'") as info:
        initializers.get("he_norml")
    assert all(name in str(info.value) for name in initializers.NAMES)
    with pytest.raises(errors.VariableDefinitionError, match="got NoneType None"):
        initializers.get(None)


@pytest.mark.parametrize("alias, name", ALIASES.items())
def test_aliases_are_the_same_functions(alias, name):
    assert getattr(initializers, alias) is getattr(initializers, name)


@pytest.mark.parametrize("name", CATALOGUE)
def test_shape_dtype_and_determinism(name):
    init = CATALOGUE[name]
    x = init(KEY, SHAPE)
    assert (x.shape, x.dtype) == (SHAPE, jnp.float32)
    assert np.isfinite(_np(x)).all()
    np.testing.assert_array_equal(init(KEY, list(SHAPE), jnp.float32), x)
    for dtype in (jnp.bfloat16, jnp.float16):
        # Half precision is drawn in float32 and rounded, not drawn coarsely in bfloat16.
        np.testing.assert_array_equal(init(KEY, SHAPE, dtype), x.astype(dtype))
    if name in RANDOM:
        assert not np.array_equal(init(jax.random.key(1), SHAPE), x)


def _init_all(key, dtype=jnp.float32):
    # One of each kind of code path: the named ones are variance_scaling (tested below).
    kinds = ("constant", "normal", "truncated_normal", "uniform", "variance_scaling", "orthogonal")
    return {name: CATALOGUE[name](key, SHAPE, dtype) for name in kinds}


def test_jit_vmap_and_eval_shape():
    keys = jax.random.split(KEY, 3)
    stacked = jax.jit(jax.vmap(_init_all))(keys)  # one compile for all: compiling is slow
    for i in range(len(keys)):
        for name, x in _init_all(keys[i]).items():
            # The same draws; the normal samplers' polynomials may round their last bits
            # apart in the batched, jitted program (Initializer, "Drawn together").
            assert_close(stacked[name][i], x)
    abstract = jax.eval_shape(lambda key: _init_all(key, jnp.bfloat16), KEY)
    for name, x in abstract.items():
        assert (x.shape, x.dtype) == (SHAPE, jnp.bfloat16), name


def test_constants():
    np.testing.assert_array_equal(initializers.zeros(KEY, (2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(initializers.ones(KEY, (2, 3)), np.ones((2, 3)))
    np.testing.assert_array_equal(initializers.constant(-7)(KEY, (2, 3)), np.full((2, 3), -7))
    row = initializers.constant(jnp.arange(3.0))(KEY, (2, 3))
    np.testing.assert_array_equal(row, [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])


def test_normal_mean_and_std():
    x = _np(initializers.normal(stddev=2.0, mean=3.0)(KEY, BIG))
    assert abs(x.mean() - 3.0) < 0.02  # standard error 0.0028
    assert abs(x.std() / 2.0 - 1) < 0.01  # standard error 0.001
    np.testing.assert_array_equal(initializers.normal(0.0, mean=1.5)(KEY, (4,)), [1.5] * 4)


def test_truncated_normal_bounds_and_std():
    x = _np(initializers.truncated_normal(stddev=0.5)(KEY, BIG))
    assert 0.99 < np.abs(x).max() <= 1.0  # cut at 2 stddev, and not thinner
    assert abs(x.std() / (0.5 * TRUNCATED_STD) - 1) < 0.01
    x = _np(initializers.truncated_normal(stddev=2.0, lower=-1.0, upper=0.5)(KEY, BIG))
    assert -2.0 <= x.min() < -1.99
    assert 0.99 < x.max() <= 1.0


def test_uniform_bounds_mean_and_std():
    x = _np(initializers.uniform(-3.0, 5.0)(KEY, BIG))
    assert -3.0 <= x.min() < -2.99
    assert 4.99 < x.max() < 5.0
    assert abs(x.mean() - 1.0) < 0.02  # standard error 0.0032
    assert abs(x.std() / (8 / math.sqrt(12)) - 1) < 0.01
    x = _np(initializers.uniform()(KEY, SHAPE))
    assert 0.0 <= x.min() and x.max() < 1.0


def _fans(shape, in_axis=-2, out_axis=-1, batch_axis=()):
    """The fan formula of the module docs, written out."""
    in_axes, out_axes, batch_axes = (
        (a,) if isinstance(a, int) else tuple(a) for a in (in_axis, out_axis, batch_axis)
    )
    named = {a % len(shape) for a in in_axes + out_axes + batch_axes}
    receptive = math.prod(d for i, d in enumerate(shape) if i not in named)
    fan_in = math.prod(shape[a] for a in in_axes) * receptive
    fan_out = math.prod(shape[a] for a in out_axes) * receptive
    return fan_in, fan_out


FAN_CASES = {
    "dense": (DENSE, {}),
    "conv2d": ((3, 3, 16, 32), {}),
    "stacked dense": ((4, 64, 32), {"batch_axis": 0}),
    "attention output": ((4, 64, 32), {"in_axis": (0, 1), "out_axis": -1}),
}
MODES = {
    "fan_in": lambda fan_in, fan_out: fan_in,
    "fan_out": lambda fan_in, fan_out: fan_out,
    "fan_avg": lambda fan_in, fan_out: (fan_in + fan_out) / 2,
    "fan_geo_avg": lambda fan_in, fan_out: math.sqrt(fan_in * fan_out),
}


def test_fan_formula_of_the_tests():
    assert _fans(DENSE) == (64, 128)
    assert _fans((3, 3, 16, 32)) == (144, 288)
    assert _fans((4, 64, 32), batch_axis=0) == (64, 32)
    assert _fans((4, 64, 32), in_axis=(0, 1), out_axis=-1) == (256, 32)


@pytest.mark.parametrize("case", FAN_CASES)
def test_variance_scaling_uniform_bound_follows_the_fans(case):
    shape, axes = FAN_CASES[case]
    for mode, fan in MODES.items():
        bound = math.sqrt(3 * 1.5 / fan(*_fans(shape, **axes)))
        x = initializers.variance_scaling(1.5, mode, "uniform", **axes)(KEY, shape)
        # With >= 4800 values max |x| is within 0.2% of the bound; a wrong fan is off by 10%+.
        assert 0.995 * bound < _max_abs(x) <= bound * (1 + 1e-6), mode


@pytest.mark.parametrize("distribution", ["normal", "truncated_normal", "uniform"])
def test_variance_scaling_std(distribution):
    for mode, fan in MODES.items():
        std = math.sqrt(0.7 / fan(*_fans(BIG)))
        x = _np(initializers.variance_scaling(0.7, mode, distribution)(KEY, BIG))
        assert abs(x.std() / std - 1) < 0.01, mode  # standard error 0.001
        assert abs(x.mean()) < 0.01 * std, mode


@pytest.mark.parametrize("name", NAMED)
def test_named_initializers_are_their_variance_scaling(name):
    factory = getattr(initializers, name)
    expected = initializers.variance_scaling(*NAMED[name])(KEY, SHAPE)
    np.testing.assert_array_equal(factory()(KEY, SHAPE), expected)
    axes = {"in_axis": -1, "out_axis": -2}
    expected = initializers.variance_scaling(*NAMED[name], **axes)(KEY, SHAPE)
    np.testing.assert_array_equal(factory(**axes)(KEY, SHAPE), expected)


def test_normal_family_is_untruncated():
    x = _np(initializers.he_normal()(KEY, BIG))
    # Of 524288 normal draws some lie beyond 4 std; a 2-std cut would leave none past 2.3 std.
    assert np.abs(x).max() > 4 * x.std()


def test_he_and_glorot_bounds_for_a_dense_kernel():
    bound = math.sqrt(6 / 64)  # PyTorch: gain sqrt(2) * sqrt(3 / fan_in)
    assert 0.99 * bound < _max_abs(initializers.he_uniform()(KEY, DENSE)) <= bound * (1 + 1e-6)
    bound = math.sqrt(6 / (64 + 128))
    glorot = initializers.glorot_uniform()(KEY, DENSE)
    assert 0.99 * bound < _max_abs(glorot) <= bound * (1 + 1e-6)


def test_empty_shapes_give_empty_arrays():
    assert initializers.he_uniform()(KEY, (0, 4)).shape == (0, 4)
    assert initializers.glorot_normal()(KEY, (3, 3, 0, 8)).shape == (3, 3, 0, 8)
    assert initializers.orthogonal()(KEY, (0, 4)).shape == (0, 4)


def test_orthogonal_conv_kernel_has_orthonormal_columns():
    w = _np(initializers.orthogonal(scale=2.0)(KEY, (3, 3, 16, 32))).reshape(-1, 32)
    np.testing.assert_allclose(w.T @ w, 4.0 * np.eye(32), atol=1e-4)


def test_orthogonal_wide_matrix_column_axis_and_bfloat16():
    w = _np(initializers.orthogonal()(KEY, DENSE))  # fewer rows than columns: rows orthonormal
    np.testing.assert_allclose(w @ w.T, np.eye(64), atol=1e-5)
    w = _np(initializers.orthogonal(column_axis=0)(KEY, (32, 3, 3, 16)))  # PyTorch's layout
    np.testing.assert_allclose(w.reshape(32, -1) @ w.reshape(32, -1).T, np.eye(32), atol=1e-5)
    w = _np(initializers.orthogonal()(KEY, DENSE, jnp.bfloat16))
    np.testing.assert_allclose(w @ w.T, np.eye(64), atol=0.03)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: initializers.normal(stddev=-1.0), ["normal", "stddev=-1.0"]),
        (lambda: initializers.normal(stddev=math.nan), ["stddev=nan"]),
        (lambda: initializers.normal(mean=math.inf), ["mean=inf"]),
        (lambda: initializers.truncated_normal(stddev=-0.1), ["truncated_normal", "stddev"]),
        (lambda: initializers.truncated_normal(lower=2.0, upper=-2.0), ["lower=2.0"]),
        (lambda: initializers.uniform(1.0, 1.0), ["minval=1.0", "maxval=1.0"]),
        (lambda: initializers.uniform(2.0, -2.0), ["minval < maxval"]),
        (lambda: initializers.uniform(0.0, math.inf), ["finite"]),
        (lambda: initializers.variance_scaling(0.0, "fan_in", "normal"), ["scale=0.0"]),
        (lambda: initializers.variance_scaling(-2.0, "fan_in", "normal"), ["positive"]),
        (lambda: initializers.variance_scaling(1.0, "fan-in", "normal"), ["'fan_in'?"]),
        (lambda: initializers.variance_scaling(1.0, "fan_in", "gaussian"), ["'uniform'"]),
    ],
)
def test_bad_settings_raise_when_the_factory_is_called(make, words):
    with pytest.raises(errors.LayerConfigError) as info:
        make()
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "init, shape, words",
    [
        (initializers.he_normal(), (5,), ["(5,)", "in_axis=-2", "bias"]),
        (initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=2), (4, 4), ["in_axis=2"]),
        (initializers.glorot_uniform(in_axis=-1), (4, 4), ["different dims", "out_axis=-1"]),
        (initializers.he_uniform(batch_axis=(0, 1)), (2, 4, 4), ["batch_axis=(0, 1)"]),
        (initializers.orthogonal(), (5,), ["(5,)", "at least 2"]),
        (initializers.orthogonal(column_axis=2), (3, 4), ["column_axis=2"]),
    ],
)
def test_shapes_an_initializer_cannot_fill_raise(init, shape, words):
    with pytest.raises(errors.LayerConfigError) as info:
        init(KEY, shape)
    for word in words:
        assert word in str(info.value)


# Against PyTorch: the same distributions, compared by bounds and spread (values cannot match).
# PyTorch lays weights out (out, in, *spatial); our kernels are (*spatial, in, out).


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


def _torch_shape(kernel_shape):
    return (kernel_shape[-1], kernel_shape[-2], *kernel_shape[:-2])


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        ("he_uniform", "kaiming_uniform_", {"mode": "fan_in", "nonlinearity": "relu"}),
        ("glorot_uniform", "xavier_uniform_", {}),
    ],
)
@pytest.mark.parametrize("kernel_shape", [DENSE, (3, 3, 16, 32)])
def test_uniform_bounds_match_pytorch(torch, ours, theirs, kwargs, kernel_shape):
    weight = getattr(torch.nn.init, theirs)(torch.empty(_torch_shape(kernel_shape)), **kwargs)
    ours_max = _max_abs(getattr(initializers, ours)()(KEY, kernel_shape))
    assert ours_max == pytest.approx(float(weight.abs().max()), rel=0.005)


@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        ("he_normal", "kaiming_normal_", {"mode": "fan_in", "nonlinearity": "relu"}),
        ("glorot_normal", "xavier_normal_", {}),
    ],
)
def test_normal_std_matches_pytorch(torch, ours, theirs, kwargs):
    weight = getattr(torch.nn.init, theirs)(torch.empty(_torch_shape(BIG)), **kwargs)
    ours_std = _np(getattr(initializers, ours)()(KEY, BIG)).std()
    assert ours_std == pytest.approx(float(weight.std()), rel=0.01)  # standard errors 0.1%


def test_default_linear_weight_recipe_matches_pytorch(torch):
    weight = torch.nn.Linear(64, 128).weight.detach()
    ours = initializers.variance_scaling(1 / 3, "fan_in", "uniform")(KEY, DENSE)
    assert _max_abs(ours) == pytest.approx(float(weight.abs().max()), rel=0.005)


def test_orthogonal_is_the_transpose_of_pytorch_recipe(torch):
    weight = torch.nn.init.orthogonal_(torch.empty(_torch_shape((3, 3, 16, 32))), gain=2.0)
    flat = weight.reshape(32, -1).numpy()
    np.testing.assert_allclose(flat @ flat.T, 4.0 * np.eye(32), atol=1e-4)
    ours = _np(initializers.orthogonal(scale=2.0)(KEY, (3, 3, 16, 32))).reshape(-1, 32)
    np.testing.assert_allclose(ours.T @ ours, 4.0 * np.eye(32), atol=1e-4)
