"""mx.checkpoint: the unwrapped computation (values, gradients, State, keys), with less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerance import assert_close, assert_trees_close  # tests/_tolerance.py

import metoryx as mx
from metoryx import errors

X = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)


class Block(mx.Module):
    """Parameters, a mutable State and a random draw: everything remat must carry."""

    def __init__(self):
        self.fc = mx.Dense(4, 4)
        self.norm = mx.BatchNorm(4)

    def __call__(self, x, is_training=True):
        h = self.norm(jnp.sin(self.fc(x)), is_training=is_training)
        return mx.dropout(h, 0.5, is_training=is_training)


class Net(mx.Module):
    def __init__(self, wrap):
        self.block = wrap(Block())
        self.head = mx.Dense(4, 1)

    def __call__(self, x):
        return self.head(self.block(x))


class Inline(mx.Module):
    """mx.checkpoint of a bound sub-module, made inside the method."""

    def __init__(self):
        self.block = Block()
        self.head = mx.Dense(4, 1)

    def __call__(self, x):
        return self.head(mx.checkpoint(self.block)(x))


def step(model):
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))

    def loss(params, x):
        out, new = apply_fn({**variables, "params": params}, jax.random.key(1), x)
        return jnp.sum(out**2), new

    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return variables, grads(variables["params"], X)


@pytest.mark.parametrize(
    "model",
    [Net(mx.checkpoint), Net(lambda b: mx.checkpoint(b, prevent_cse=False)), Inline()],
    ids=["wrapper", "wrapper-no-cse", "inline"],
)
def test_checkpoint_equals_the_unwrapped_model(model):
    plain_vars, ((plain_loss, plain_new), plain_grads) = step(Net(lambda b: b))
    variables, ((loss, new), grads) = step(model)
    # The wrapper adds no path part: the same variables, the same dropout keys.
    assert jax.tree.structure(variables) == jax.tree.structure(plain_vars)
    # Recomputed, the forward pass may be fused and summed in another order than the saved one:
    # ~30 roundings (a 4-term dot, 3-sample statistics, the head's dot, the loss's sum, and as
    # many back), within tests/_tolerance.py's bound.
    assert_close(loss, plain_loss, n=30)
    assert_trees_close(grads, plain_grads, n=30)
    assert_trees_close(new, plain_new, n=30)
    assert not np.allclose(new["batch_stats"]["block"]["norm"]["mean"], 0.0)


def test_the_program_holds_a_checkpoint_with_the_policy():
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    model = Net(lambda b: mx.checkpoint(b, policy=policy))
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda v: apply_fn(v, jax.random.key(1), X)[0])(variables)
    (remat,) = [e for e in jaxpr.eqns if e.primitive.name in ("checkpoint", "remat2")]
    assert remat.params["policy"] is policy
    assert "dot_general" in str(remat.params["jaxpr"])


def test_a_function_with_static_arguments_and_outside_apply():
    def scaled(x, power):
        return x**power

    f = mx.checkpoint(scaled, static_argnums=1)
    assert_close(jax.grad(lambda x: f(x, 3).sum())(X), 3 * X**2, n=2)


def test_keys_drawn_after_the_checkpoint_continue_its_counter():
    class Two(mx.Module):
        def __call__(self, x):
            inside = mx.checkpoint(lambda x: x + jax.random.normal(mx.next_rng_key(), x.shape))
            return inside(x), jax.random.normal(mx.next_rng_key(), x.shape)

    class Plain(mx.Module):
        def __call__(self, x):
            first = x + jax.random.normal(mx.next_rng_key(), x.shape)
            return first, jax.random.normal(mx.next_rng_key(), x.shape)

    got, _ = mx.apply(Two())({}, jax.random.key(3), X)
    expected, _ = mx.apply(Plain())({}, jax.random.key(3), X)
    for a, b in zip(got, expected, strict=True):  # eager: the same operations, one by one
        np.testing.assert_array_equal(a, b)


def test_remat_lowers_the_peak_memory_of_a_deep_train_step():
    def temp_bytes(remat):
        layer = lambda: mx.Sequential(mx.Dense(32, 32), jnp.tanh)  # noqa: E731
        model = mx.Repeat(lambda: mx.Sequential(layer(), layer(), layer()), 6, remat=remat)
        init_fn, apply_fn = mx.transform(model)
        variables = init_fn(jax.random.key(0))
        x = jnp.ones((256, 32))

        def train_step(params):
            loss = lambda p: jnp.sum(apply_fn({"params": p}, None, x)[0] ** 2)  # noqa: E731
            grads = jax.grad(loss)(params)
            return optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads))

        compiled = jax.jit(train_step).lower(variables["params"]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # Without remat the loop stores every layer's activations of all 6 copies for the
    # backward pass; with it, only each copy's input (the carry), recomputing the rest.
    assert temp_bytes(True) < 0.5 * temp_bytes(False)


def test_checkpoint_of_something_not_callable_says_what_it_takes():
    with pytest.raises(errors.LayerConfigError, match="a module or a callable"):
        mx.checkpoint(3)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"static_argnums": None}, "`static_argnums` must be an int or a tuple of ints"),
        ({"static_argnums": (0, "1")}, r"`static_argnums`.*\(0, '1'\)"),
        ({"static_argnums": -1}, "`static_argnums`"),
        ({"policy": "dots_saveable"}, r"`policy` must be None \(save nothing\) or a policy"),
        ({"prevent_cse": "yes"}, "`prevent_cse` must be a bool"),
    ],
)
def test_bad_options_are_named_at_construction(options, match):
    with pytest.raises(errors.LayerConfigError, match=match):
        mx.checkpoint(mx.Dense(2, 2), **options)
