"""Tests of metoryx/nn/_compute.py: the checks layers share for their computation dtype and their
``is_training`` flag, through every layer that uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors
from metoryx.nn._compute import layer_dtype, training_flag
from metoryx.nn.reparametrization import SpectralNorm

# Each layer that chooses its code path with is_training, and an input it takes.
FLAG_LAYERS = {
    "Dropout": (lambda: mx.Dropout(0.5), (4, 3), "dropout in Dropout"),
    "BatchNorm": (lambda: mx.BatchNorm(3), (4, 3), "BatchNorm"),
    "MLP": (lambda: mx.MLP(3, [4], 2, dropout_rate=0.1), (4, 3), "dropout in MLP"),
    "MultiHeadAttention": (lambda: mx.MultiHeadAttention(1, 3), (1, 2, 3), "MultiHeadAttention"),
    "SpectralNorm": (lambda: SpectralNorm(mx.Dense(3, 2)), (4, 3), "SpectralNorm"),
    "StackedRNN": (
        lambda: mx.StackedRNN(mx.RNN(mx.GRUCell(3, 3)), mx.RNN(mx.GRUCell(3, 3)), dropout_rate=0.1),
        (1, 2, 3),
        "dropout in StackedRNN",
    ),
}

# Each layer with a computation dtype argument.
DTYPE_LAYERS = {
    "Dense": lambda dtype: mx.Dense(2, 3, dtype=dtype),
    "Einsum": lambda dtype: mx.Einsum("bi,io->bo", (2, 3), dtype=dtype),
    "Embed": lambda dtype: mx.Embed(5, 3, dtype=dtype),
    "Conv": lambda dtype: mx.Conv(2, 3, (3,), dtype=dtype),
    "ConvTranspose": lambda dtype: mx.ConvTranspose(2, 3, (3,), dtype=dtype),
    "BatchNorm": lambda dtype: mx.BatchNorm(3, dtype=dtype),
    "LayerNorm": lambda dtype: mx.LayerNorm(3, dtype=dtype),
    "RMSNorm": lambda dtype: mx.RMSNorm(3, dtype=dtype),
    "GroupNorm": lambda dtype: mx.GroupNorm(1, 3, dtype=dtype),
    "InstanceNorm": lambda dtype: mx.InstanceNorm(3, dtype=dtype),
    "PReLU": lambda dtype: mx.PReLU(dtype=dtype),
    "MultiHeadAttention": lambda dtype: mx.MultiHeadAttention(1, 3, dtype=dtype),
    "GRUCell": lambda dtype: mx.GRUCell(2, 3, dtype=dtype),
    "LSTMCell": lambda dtype: mx.LSTMCell(2, 3, dtype=dtype),
    "SimpleRNNCell": lambda dtype: mx.SimpleRNNCell(2, 3, dtype=dtype),
}


@pytest.mark.parametrize("name", FLAG_LAYERS)
def test_a_traced_is_training_names_the_layer_and_static_argnames(name):
    make, shape, label = FLAG_LAYERS[name]
    init_fn, apply_fn = mx.transform(make())
    variables = init_fn(0)
    x = jnp.ones(shape)
    with pytest.raises(errors.StaticArgumentError) as info:
        jax.jit(apply_fn)(variables, jax.random.key(0), x, is_training=True)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert message.startswith(label) and "static_argnames='is_training'" in message
    jitted = jax.jit(apply_fn, static_argnames="is_training")
    jitted(variables, jax.random.key(0), x, is_training=True)


@pytest.mark.parametrize("name", FLAG_LAYERS)
@pytest.mark.parametrize("flag", ["False", None, 1, [True], jnp.array([True, False])])
def test_an_is_training_that_is_no_bool_is_refused(name, flag):
    make, shape, label = FLAG_LAYERS[name]
    init_fn, apply_fn = mx.transform(make())
    with pytest.raises(errors.StaticArgumentError, match="must be a bool") as info:
        apply_fn(init_fn(0), jax.random.key(0), jnp.ones(shape), is_training=flag)
    assert str(info.value).startswith(label)


@pytest.mark.parametrize("flag", [True, False, np.bool_(True), np.array(False), jnp.array(True)])
def test_training_flag_takes_bools_and_concrete_bool_scalars(flag):
    assert training_flag(flag, lambda: "layer") is bool(flag)


def test_dropout_the_function_checks_its_flag_too():
    with pytest.raises(errors.StaticArgumentError, match="^dropout: `is_training`"):
        jax.jit(lambda x, t: mx.dropout(x, 0.5, t, rng=jax.random.key(0)))(jnp.ones(2), True)


@pytest.mark.parametrize("name", DTYPE_LAYERS)
@pytest.mark.parametrize("dtype", [object, str, "U3", bytes, "datetime64[s]", "float33"])
def test_a_non_numeric_computation_dtype_is_refused_at_definition(name, dtype):
    with pytest.raises(errors.LayerConfigError, match="numeric dtype") as info:
        DTYPE_LAYERS[name](dtype)
    assert str(info.value).startswith(f"{name}: `dtype`")


@pytest.mark.parametrize("name", DTYPE_LAYERS)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16, "float16", np.float32])
def test_numeric_computation_dtypes_are_kept_as_given(name, dtype):
    assert DTYPE_LAYERS[name](dtype).dtype is dtype


def test_layer_dtype_names_the_layer():
    with pytest.raises(errors.LayerConfigError, match="^Mine: `dtype`.*got <class 'object'>"):
        layer_dtype("Mine", object)
