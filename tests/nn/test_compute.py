"""Tests of metoryx/nn/_compute.py: the checks layers share for their computation dtype and their
``is_training`` flag, and the per-layer ``training`` switch, through every layer that uses them."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors
from metoryx.nn._compute import differentiated_as, layer_dtype, training_flag

# Each layer that chooses its code path with is_training, an input it takes, and how errors
# name it. Its training differs from its evaluation in the output or the new variables.
FLAG_LAYERS = {
    "Dropout": (lambda: mx.Dropout(0.5), (4, 3), "Dropout"),
    "BatchNorm": (lambda: mx.BatchNorm(3), (4, 3), "BatchNorm"),
    "MLP": (lambda: mx.MLP(3, [4], 2, dropout_rate=0.5), (4, 3), "MLP"),
    "MultiHeadAttention": (
        lambda: mx.MultiHeadAttention(1, 3, dropout_rate=0.5),
        (1, 2, 3),
        "MultiHeadAttention",
    ),
    "SpectralNorm": (lambda: mx.SpectralNorm(mx.Dense(3, 2)), (4, 3), "SpectralNorm"),
    "StackedRNN": (
        lambda: mx.StackedRNN(mx.RNN(mx.GRUCell(3, 3)), mx.RNN(mx.GRUCell(3, 3)), dropout_rate=0.5),
        (1, 2, 3),
        "StackedRNN",
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


def test_every_layer_with_an_is_training_argument_has_a_switch_and_is_tested_here():
    with_flag = {
        name
        for name in mx.__all__
        if inspect.isclass(getattr(mx, name))
        and issubclass(getattr(mx, name), mx.Module)
        and "is_training" in inspect.signature(getattr(mx, name).__call__).parameters
    }
    # mx.LoRA's flag is optional (its adapters' dropout): tests/test_lora.py tests its switch.
    assert with_flag == {*FLAG_LAYERS, "LoRA"}
    assert all(getattr(mx, name).training is None for name in with_flag)


class _Holder(mx.Module):
    """Puts the layer at the path 'block', so that errors name it."""

    def __init__(self, layer):
        self.block = layer

    def __call__(self, x, is_training):
        return self.block(x, is_training=is_training)


def _run(layer, shape, is_training):
    init_fn, apply_fn = mx.transform(_Holder(layer))
    variables = init_fn(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), shape)
    out, new = apply_fn(variables, jax.random.key(2), x, is_training=is_training)
    return out, new, variables


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", FLAG_LAYERS)
def test_training_false_evaluates_in_a_training_call_and_keeps_the_variables(name):
    make, shape, _ = FLAG_LAYERS[name]
    switched = make()
    switched.training = False
    out, new, variables = _run(switched, shape, is_training=True)
    eval_out, _, _ = _run(make(), shape, is_training=False)
    train_out, train_new, _ = _run(make(), shape, is_training=True)
    _assert_same(out, eval_out)  # the same evaluation program: bit for bit
    _assert_same(new, variables)  # running statistics, u and v untouched
    trained = jax.tree.leaves((train_out, train_new))
    evaluated = jax.tree.leaves((eval_out, variables))
    assert any(not np.array_equal(a, b) for a, b in zip(trained, evaluated, strict=True))


@pytest.mark.parametrize("name", FLAG_LAYERS)
def test_training_true_trains_in_an_evaluation_call(name):
    make, shape, _ = FLAG_LAYERS[name]
    switched = make()
    switched.training = True
    out, new, _ = _run(switched, shape, is_training=False)
    train_out, train_new, _ = _run(make(), shape, is_training=True)
    _assert_same(out, train_out)
    _assert_same(new, train_new)


@pytest.mark.parametrize("name", FLAG_LAYERS)
def test_training_none_follows_the_call(name):
    make, shape, _ = FLAG_LAYERS[name]
    switched = make()
    switched.training = False
    switched.training = None
    for flag in (True, False):
        _assert_same(_run(switched, shape, flag)[:2], _run(make(), shape, flag)[:2])


@pytest.mark.parametrize("name", FLAG_LAYERS)
@pytest.mark.parametrize("switch", ["False", 0, 1, np.bool_(False), jnp.array(True)])
def test_a_switch_that_is_not_none_or_a_bool_names_the_layer_path(name, switch):
    make, shape, label = FLAG_LAYERS[name]
    layer = make()
    layer.training = switch
    with pytest.raises(errors.LayerConfigError) as info:
        _run(layer, shape, is_training=True)
    message = str(info.value)
    assert message.startswith(f"{label} at 'block': `training`")
    assert "None (follow the call's is_training)" in message and "mx.set_training" in message


@pytest.mark.parametrize("name", FLAG_LAYERS)
def test_the_call_flag_is_checked_even_where_the_switch_decides(name):
    make, shape, label = FLAG_LAYERS[name]
    layer = make()
    layer.training = False
    with pytest.raises(errors.StaticArgumentError, match="must be a bool") as info:
        _run(layer, shape, is_training="True")
    assert str(info.value).startswith(f"{label} at 'block'")


@pytest.mark.parametrize("name", FLAG_LAYERS)
def test_print_shows_a_set_switch_only(name):
    layer = FLAG_LAYERS[name][0]()
    assert "training=" not in repr(layer)
    for switch in (False, True):
        layer.training = switch
        assert layer.extra_repr().endswith(f", training={switch}")
        assert f", training={switch}" in repr(layer)


def test_a_switch_costs_nothing_the_program_is_the_evaluation_one():
    bn = mx.BatchNorm(3)
    init_fn, follow = mx.transform(bn)
    bn.training = False
    _, fixed = mx.transform(bn)
    variables, x = init_fn(jax.random.key(0)), jnp.ones((4, 3))
    eval_jaxpr = jax.make_jaxpr(follow, static_argnums=(1, 3))(variables, None, x, False)
    fixed_jaxpr = jax.make_jaxpr(fixed, static_argnums=(1, 3))(variables, None, x, True)
    assert str(fixed_jaxpr) == str(eval_jaxpr)


def test_a_layer_of_your_own_opts_in_with_the_class_attribute():
    class Noise(mx.Module):
        training: bool | None = None

        def __call__(self, x, is_training):
            return x + 1.0 if mx.layer_training(self, is_training) else x

    layer = mx.set_training(Noise(), False)
    _, apply_fn = mx.transform(layer)
    assert float(apply_fn({}, None, jnp.zeros(()), True)[0]) == 0.0


def test_layer_training_asks_a_layer_without_the_declaration_to_declare_it():
    class Undeclared(mx.Module):
        def __call__(self, x, is_training):
            return x if mx.layer_training(self, is_training) else -x

    _, apply_fn = mx.transform(Undeclared())
    with pytest.raises(errors.LayerConfigError, match="declares no training switch") as info:
        apply_fn({}, None, jnp.zeros(()), True)
    assert "`training: bool | None = None` to Undeclared" in str(info.value)


def test_differentiated_as_runs_fn_and_differentiates_form(all_equations):
    # A form that is another function, so that the test sees which one is differentiated.
    f = differentiated_as(lambda a, b: a @ b, lambda a, b: 2.0 * (a @ b))
    # Small integers: every product and sum is exact in float32 (and in the bfloat16 passes of a
    # GPU's or TPU's default precision), in any order, so the results compare bit for bit.
    a, b = jnp.arange(6.0).reshape(2, 3), jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(f(a, b), a @ b)
    ga, gb = jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(a, b)
    np.testing.assert_array_equal(ga, 2.0 * jnp.ones((2, 4)) @ b.T)
    np.testing.assert_array_equal(gb, 2.0 * a.T @ jnp.ones((2, 4)))
    _, tangent = jax.jvp(lambda a: f(a, b), (a,), (jnp.ones_like(a),))
    np.testing.assert_array_equal(tangent, 2.0 * jnp.ones_like(a) @ b)
    # b not differentiated: its tangent is a symbolic zero, held constant, so the JVP has one
    # product (da @ b), not two (da @ b + a @ zeros): with the transpose, two in all.
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: f(a, b).sum()))(a).jaxpr
    products = [e for e in all_equations(jaxpr) if e.primitive.name == "dot_general"]
    assert len(products) == 2
