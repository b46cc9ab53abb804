"""Dense: PyTorch parity, batch axes, the jaxpr of a hand-written layer, dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx


@pytest.mark.parametrize(
    "batch, use_bias", [((), True), ((4,), True), ((2, 3), True), ((4,), False)]
)
def test_matches_torch_linear(torch, assert_matches_torch, kernel_bias_fn, batch, use_bias):
    linear = torch.nn.Linear(5, 3, bias=use_bias)
    x = torch.randn(*batch, 5)
    params = [linear.weight] + ([linear.bias] if use_bias else [])
    assert_matches_torch(
        kernel_bias_fn(mx.Dense(5, 3, use_bias=use_bias)),
        lambda x, *params: linear(x) if not params else torch.nn.functional.linear(x, *params),
        [x, *params],
        layouts=[None, (1, 0), None][: 1 + len(params)],
    )


def test_variables():
    params = mx.transform(mx.Dense(5, 3))[0](jax.random.key(0))["params"]
    assert params["kernel"].shape == (5, 3) and params["kernel"].dtype == jnp.float32
    assert float(jnp.abs(params["kernel"]).min()) > 0  # lecun_normal draws
    np.testing.assert_array_equal(params["bias"], np.zeros(3))
    no_bias, _ = mx.transform(mx.Dense(5, 3, use_bias=False))
    assert jax.tree.map(jnp.shape, jax.eval_shape(no_bias, jax.random.key(0))) == {
        "params": {"kernel": (5, 3)}
    }


def test_custom_initializers():
    ones, half = mx.initializers.ones, mx.initializers.constant(0.5)
    layer = mx.Dense(5, 3, kernel_init=ones, bias_init=half)
    params = mx.transform(layer)[0](jax.random.key(0))["params"]
    np.testing.assert_array_equal(params["kernel"], np.ones((5, 3)))
    np.testing.assert_array_equal(params["bias"], np.full(3, 0.5))


@pytest.mark.parametrize("batch", [(), (8,), (2, 8)])
def test_jaxpr_equals_hand_written(numpy_init, jitted_equations, batch):
    init_fn, apply_fn = mx.transform(mx.Dense(16, 4))
    params = numpy_init(init_fn)["params"]
    x = jnp.ones((*batch, 16))

    def hand_written(params, x):
        with jax.numpy_rank_promotion("allow"):
            return x @ params["kernel"] + params["bias"]

    ours = jitted_equations(lambda p, x: apply_fn({"params": p}, None, x)[0], params, x)
    assert ours == jitted_equations(hand_written, params, x)
    # dot_general (+ broadcast_in_dim with batch axes) + add: no convert_element_type, no reshape.
    assert len(ours) == (3 if batch else 2)


def test_computation_dtype(numpy_init):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
    layer = mx.Dense(8, 3, dtype=jnp.bfloat16)
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    assert variables["params"]["kernel"].dtype == jnp.float32  # storage stays float32
    y, _ = apply_fn(variables, None, x)
    assert y.dtype == jnp.bfloat16
    reference, _ = mx.transform(mx.Dense(8, 3))[1](variables, None, x)
    np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=5e-2, rtol=5e-2)
    grads = jax.jit(jax.grad(lambda v: apply_fn(v, None, x)[0].astype(jnp.float32).sum()))(
        variables
    )
    assert grads["params"]["kernel"].dtype == jnp.float32


def test_param_dtype(numpy_init):
    init_fn, apply_fn = mx.transform(mx.Dense(8, 3, param_dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    x16 = jnp.ones((2, 8), jnp.bfloat16)
    y, _ = apply_fn(variables, None, x16)
    assert y.dtype == jnp.bfloat16
    # dtype=None and agreeing dtypes: no cast at all.
    jaxpr = jax.make_jaxpr(lambda v, x: apply_fn(v, None, x)[0])(variables, x16)
    assert "convert_element_type" not in [e.primitive.name for e in jaxpr.jaxpr.eqns]
    # dtype=None with a float32 input: promoted to float32, as JAX would (also under strict).
    y32, _ = apply_fn(variables, None, jnp.ones((2, 8)))
    assert y32.dtype == jnp.float32


def test_integer_input_promotes_to_parameter_dtype(numpy_init):
    init_fn, apply_fn = mx.transform(mx.Dense(3, 2))
    y, _ = apply_fn(numpy_init(init_fn), None, jnp.arange(6, dtype=jnp.int32).reshape(2, 3))
    assert y.dtype == jnp.float32


class _Net(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(5, 3)

    def __call__(self, x):
        return self.fc(x)


@pytest.mark.parametrize("shape", [(2, 4), ()])
def test_wrong_input_size(numpy_init, shape):
    init_fn, apply_fn = mx.transform(_Net())
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones(shape))
    message = str(info.value)
    assert "Dense at 'fc'" in message
    assert "in_size=5" in message and str(shape) in message
    assert "in_size equal to the input's last axis" in message


@pytest.mark.parametrize("sizes", [(0, 3), (3, -1), (2.5, 3), (True, 3), ("4", 3)])
def test_bad_sizes(sizes):
    with pytest.raises(mx.errors.LayerConfigError, match="positive int"):
        mx.Dense(*sizes)


def test_repr():
    assert mx.Dense(3, 4).extra_repr() == "in_size=3, out_size=4, use_bias=True"
    assert "in_size=3, out_size=4" in repr(mx.Dense(3, 4))
