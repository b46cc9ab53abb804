"""Activations: JAX's functions re-exported as they are (those with configuration checked, then
computed by JAX's), documented in the module; PReLU against PyTorch, its variables, dtypes and
errors."""

import inspect
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx.nn import activations
from metoryx.nn.activations import PReLU

JAX_FUNCTIONS = [name for name in activations.__all__ if name != "PReLU"]
# The functions that take configuration: checked by metoryx, computed by JAX's own.
CHECKED = {
    "leaky_relu": {"negative_slope": 0.2},
    "elu": {"alpha": 0.5},
    "celu": {"alpha": 0.5},
    "glu": {"axis": 0},
    "softmax": {"axis": (0, 1)},
    "log_softmax": {"axis": 0},
    "gelu": {"approximate": False},
}
X = jnp.linspace(-3.0, 3.0, 24).reshape(4, 6)


@pytest.mark.parametrize("name", sorted(set(JAX_FUNCTIONS) - set(CHECKED)))
def test_functions_are_jax_own(name):
    source = jnp if name == "tanh" else jax.nn
    assert getattr(activations, name) is getattr(source, name)
    assert getattr(mx, name) is getattr(source, name)


@pytest.mark.parametrize("name", CHECKED)
def test_checked_functions_are_jax_own_program(name):
    ours, theirs = getattr(mx, name), getattr(jax.nn, name)
    for kwargs in ({}, CHECKED[name]):
        program = [str(jax.make_jaxpr(partial(f, **kwargs))(X)) for f in (ours, theirs)]
        assert program[0] == program[1]
        np.testing.assert_array_equal(ours(X, **kwargs), theirs(X, **kwargs))


def test_coefficients_may_be_arrays_traced_or_per_channel():
    slopes = jnp.linspace(0.1, 0.6, 6)
    expected = jnp.where(X >= 0, X, slopes[None] * X)
    np.testing.assert_allclose(mx.leaky_relu(X, slopes), expected)  # (6,): axes added by us
    traced = jax.jit(lambda x, s: mx.leaky_relu(x, s))(X, jnp.float32(0.2))
    np.testing.assert_array_equal(traced, jax.nn.leaky_relu(X, 0.2))
    np.testing.assert_array_equal(mx.elu(X, np.full((4, 1), 0.5)), jax.nn.elu(X, 0.5))
    bf16 = X.astype(jnp.bfloat16)
    assert mx.celu(bf16, np.float64(0.5)).dtype == jnp.bfloat16  # a number keeps x's dtype


# Found by tests/test_bad_arguments.py: JAX's functions took these to a raw TypeError,
# ValueError, IndexError or AssertionError, or (gelu) read any truthy value as True.
BAD = [
    (lambda: mx.leaky_relu(X, "0.1"), "leaky_relu: `negative_slope` must be a finite number"),
    (lambda: mx.leaky_relu(X, None), "got None"),
    (lambda: mx.leaky_relu(X, 2**70 * 1.0j), "negative_slope"),
    (lambda: mx.leaky_relu(X, jnp.ones((2, 2))), "broadcasts to the input's shape (4, 6)"),
    (lambda: mx.leaky_relu(X, jax.random.key(0)), "dtype key<fry>"),
    (lambda: mx.elu(X, float("nan")), "elu: `alpha` must be a finite number"),
    (lambda: mx.elu(X, [0.5]), "elu: `alpha`"),
    (lambda: mx.celu(X, 0), "celu: `alpha` must not be 0"),
    (lambda: mx.celu(X, True), "celu: `alpha`"),
    (lambda: mx.glu(X, 2), "glu: `axis` must be an int in [-2, 2)"),
    (lambda: mx.glu(X, "0"), "got '0'"),
    (lambda: mx.glu(X, 2**70), "axis"),
    (lambda: mx.softmax(X, 1.0), "softmax: `axis` must be an int in [-2, 2)"),
    (lambda: mx.softmax(X, (0, -2)), "names an axis twice"),
    (lambda: mx.log_softmax(X, [0, 5]), "log_softmax: `axis`"),
    (lambda: mx.gelu(X, "no"), "gelu: `approximate` must be True or False"),
]


@pytest.mark.parametrize("call, match", BAD)
def test_bad_configuration_is_a_layer_config_error(call, match):
    with pytest.raises(mx.errors.LayerConfigError) as info:
        call()
    assert match in str(info.value)


def test_glu_of_an_odd_axis_is_an_input_shape_error():
    with pytest.raises(mx.errors.InputShapeError, match="odd size 3"):
        mx.glu(jnp.ones((2, 3)))
    assert mx.glu(X, 0).shape == (2, 6) and mx.softmax(X, [0, 1]).shape == (4, 6)


def test_module_docstring_lists_every_function_and_prelu():
    doc = activations.__doc__
    for name in JAX_FUNCTIONS:
        assert f"``{name}``" in doc, name
    assert "PReLU" in doc and mx.PReLU is PReLU


def _prelu_fn(layer):
    _, apply_fn = mx.transform(layer)
    return lambda x, weight: apply_fn({"params": {"weight": weight}}, None, x)[0]


@pytest.mark.parametrize("shape", [(7,), (2, 3, 5)])
def test_shared_slope_matches_torch(torch, assert_matches_torch, shape):
    weight = torch.tensor([0.3])
    assert_matches_torch(
        _prelu_fn(PReLU()),
        torch.nn.functional.prelu,
        [torch.randn(*shape), weight],
        layouts=[None, None],
    )


@pytest.mark.parametrize("spatial", [(), (5,), (3, 4)])
def test_per_channel_slopes_match_torch(torch, assert_matches_torch, spatial):
    # PyTorch: (N, C, *spatial); ours: (N, *spatial, C).
    to_ours = (0, *range(2, 2 + len(spatial)), 1)
    layer = torch.nn.PReLU(num_parameters=4)
    np.testing.assert_array_equal(layer.weight.detach(), np.full(4, 0.25))  # the same default
    assert_matches_torch(
        _prelu_fn(PReLU(4)),
        torch.nn.functional.prelu,
        [torch.randn(2, 4, *spatial), torch.rand(4) - 0.5],
        layouts=[to_ours, None],
        out_layout=to_ours,
    )


def test_gradient_at_zero_is_the_negative_side_as_in_torch():
    _, apply_fn = mx.transform(PReLU(init_value=0.2))
    variables = {"params": {"weight": jnp.array([0.2])}}
    grad = jax.grad(lambda x: apply_fn(variables, None, x)[0].sum())(jnp.zeros(3))
    np.testing.assert_allclose(grad, np.full(3, 0.2))


def test_variables():
    params = mx.transform(PReLU(3, init_value=0.1)).init(jax.random.key(0))["params"]
    assert list(params) == ["weight"]
    np.testing.assert_allclose(params["weight"], np.full(3, 0.1))
    assert params["weight"].dtype == jnp.float32
    shared = mx.transform(PReLU()).init(jax.random.key(0))["params"]["weight"]
    np.testing.assert_array_equal(shared, np.full(1, 0.25))
    assert PReLU(3).extra_repr() == "size=3"


def test_values():
    _, apply_fn = mx.transform(PReLU(2))
    variables = {"params": {"weight": jnp.array([0.5, 2.0])}}
    y, _ = apply_fn(variables, None, jnp.array([[-1.0, -1.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(y, np.array([[-0.5, -2.0], [3.0, 4.0]]))
    _, apply_fn = mx.transform(PReLU())
    y, _ = apply_fn({"params": {"weight": jnp.array([0.5])}}, None, -2.0)
    assert y.shape == () and float(y) == -1.0  # a scalar input, one shared slope


def test_dtypes():
    init_fn, apply_fn = mx.transform(PReLU(3, param_dtype=jnp.bfloat16))
    variables = init_fn(jax.random.key(0))
    assert variables["params"]["weight"].dtype == jnp.bfloat16
    assert apply_fn(variables, None, jnp.ones((2, 3), jnp.bfloat16))[0].dtype == jnp.bfloat16
    assert apply_fn(variables, None, jnp.ones((2, 3)))[0].dtype == jnp.float32
    _, apply_fn = mx.transform(PReLU(3, dtype=jnp.bfloat16))
    y, _ = apply_fn(mx.transform(PReLU(3)).init(0), None, -jnp.ones((2, 3)))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y.astype(jnp.float32), np.full((2, 3), -0.25))


class _Net(mx.Module):
    def __init__(self):
        self.act = PReLU(4)

    def __call__(self, x):
        return self.act(x)


@pytest.mark.parametrize("shape", [(2, 4, 5), (4, 3), ()])
def test_wrong_channels(shape):
    init_fn, apply_fn = mx.transform(_Net())
    variables = init_fn(0)
    assert apply_fn(variables, None, jnp.ones((2, 5, 4)))[0].shape == (2, 5, 4)
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(variables, None, jnp.ones(shape))
    message = str(info.value)
    assert message.startswith("PReLU at 'act': ") and "size=4" in message
    assert "last axis" in message and "size=1" in message


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_size(size):
    with pytest.raises(mx.errors.LayerConfigError, match="PReLU: `size` must be a positive int"):
        PReLU(size)


@pytest.mark.parametrize("init_value", [float("nan"), "0.25", None])
def test_bad_init_value(init_value):
    with pytest.raises(mx.errors.LayerConfigError, match="PReLU: `init_value` must be a finite"):
        PReLU(2, init_value)


def test_dtype_arguments_in_the_order_of_every_layer():
    assert list(inspect.signature(PReLU).parameters)[-2:] == ["dtype", "param_dtype"]
    layer = PReLU(2, 0.1, jnp.bfloat16, jnp.float16)
    assert layer.dtype == jnp.bfloat16 and layer.weight.dtype == jnp.float16
