"""Tests of metoryx/_core/arguments.py: the bool flags of layers and lifted wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors
from metoryx._core.arguments import bool_argument

# Each flag a layer or wrapper builds from, with the layer made with that flag.
FLAGS = {
    "Dense.use_bias": lambda v: mx.Dense(2, 3, use_bias=v),
    "Conv.use_bias": lambda v: mx.Conv(2, 3, (3,), use_bias=v),
    "ConvTranspose.use_bias": lambda v: mx.ConvTranspose(2, 3, (3,), use_bias=v),
    "LayerNorm.use_scale": lambda v: mx.LayerNorm(3, use_scale=v),
    "BatchNorm.use_bias": lambda v: mx.BatchNorm(3, use_bias=v),
    "GroupNorm.use_bias": lambda v: mx.GroupNorm(1, 3, use_bias=v),
    "InstanceNorm.use_scale": lambda v: mx.InstanceNorm(3, use_scale=v),
    "RMSNorm.use_scale": lambda v: mx.RMSNorm(3, use_scale=v),
    "MultiHeadAttention.use_bias": lambda v: mx.MultiHeadAttention(1, 3, use_bias=v),
    "GRUCell.use_bias": lambda v: mx.GRUCell(2, 3, use_bias=v),
    "RNN.return_sequences": lambda v: mx.RNN(mx.GRUCell(2, 3), return_sequences=v),
    "RNN.reverse": lambda v: mx.RNN(mx.GRUCell(2, 3), reverse=v),
    "RNN.time_major": lambda v: mx.RNN(mx.GRUCell(2, 3), time_major=v),
    "scan.reverse": lambda v: mx.scan(mx.GRUCell(2, 2), length=2, reverse=v),
    "scan.remat": lambda v: mx.scan(mx.GRUCell(2, 2), length=2, remat=v),
    "Repeat.remat": lambda v: mx.Repeat(lambda: mx.Dense(2, 2), 2, remat=v),
}


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", ["no", None, 0, 1.0, np.array([True, False]), jax.random.key(0)])
def test_a_flag_that_is_no_bool_is_refused_naming_the_layer_and_argument(flag, value):
    layer, name = flag.split(".")
    with pytest.raises(errors.LayerConfigError, match=f"`{name}` must be True or False") as info:
        FLAGS[flag](value)
    assert layer in str(info.value)


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", [True, False, np.bool_(False)])
def test_bools_are_taken(flag, value):
    FLAGS[flag](value)


def test_bool_argument_gives_a_python_bool():
    assert bool_argument("L", "f", np.bool_(True)) is True
    with pytest.raises(errors.LayerConfigError, match="^L: `f` must be True or False, got str"):
        bool_argument("L", "f", "True")


def test_a_layer_without_the_flagged_variable_has_none():
    assert mx.Dense(2, 3, use_bias=np.bool_(False)).bias is None
    assert jnp.shape(mx.init(mx.LayerNorm(3, use_scale=False))(0)["params"]["bias"]) == (3,)
