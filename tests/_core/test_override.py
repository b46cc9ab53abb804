"""Tests of metoryx/_core/override.py: a module's variables read as other arrays in a block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors
from metoryx._core.override import overridden


class Scaled(mx.Module):
    """``x * w + b``, with a Parameter, a read-only State, a mutable State and a container."""

    def __init__(self):
        self.w = mx.Parameter(mx.initializers.ones, (3,))
        self.b = mx.State("consts", mx.initializers.zeros, (3,), mutable=False)
        self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.pair = [mx.Parameter(mx.initializers.ones, (2,))]
        self.size = 3

    def __call__(self, x):
        self.calls = self.calls + 1
        return x * self.w + self.b


class Outer(mx.Module):
    """Runs ``action(inner, x)`` in apply_fn; ``tied`` holds the same ``w`` as ``inner``."""

    def __init__(self):
        self.inner = Scaled()
        self.tied = Scaled()
        self.tied.w = self.inner.w

    def __call__(self, action, x):
        return action(self, x)


def run(action, x=None, variables=None):
    init_fn, apply_fn = mx.transform(Outer())
    variables = init_fn(jax.random.key(0)) if variables is None else variables
    return apply_fn(variables, None, action, jnp.ones(3) if x is None else x), variables


def test_reads_the_array_inside_the_block_and_the_variable_after():
    def action(model, x):
        with overridden(model.inner, w=jnp.full(3, 2.0), b=jnp.full(3, 5.0)):
            inside = model.inner(x)
        return inside, model.inner(x)

    ((inside, after), new_variables), variables = run(action)
    np.testing.assert_array_equal(inside, jnp.full(3, 7.0))
    np.testing.assert_array_equal(after, jnp.ones(3))
    # The model has mutable State, so new_variables is rebuilt from the frame's slots.
    assert new_variables["params"] is not variables["params"]
    jax.tree.map(np.testing.assert_array_equal, new_variables["params"], variables["params"])
    np.testing.assert_array_equal(new_variables["consts"]["inner"]["b"], jnp.zeros(3))
    assert int(new_variables["counters"]["inner"]["calls"]) == 2  # updates inside are kept


def test_restores_after_an_exception():
    def action(model, x):
        with pytest.raises(ZeroDivisionError):
            with overridden(model.inner, w=jnp.zeros(3)):
                raise ZeroDivisionError
        return model.inner.w

    (w, new_variables), _ = run(action)
    np.testing.assert_array_equal(w, jnp.ones(3))
    np.testing.assert_array_equal(new_variables["params"]["inner"]["w"], jnp.ones(3))


def test_nested_and_overlapping_blocks():
    def action(model, x):
        seen = []
        with overridden(model.inner, w=jnp.full(3, 2.0)):
            seen.append(model.inner.w)
            with overridden(model.inner, w=jnp.full(3, 3.0), b=jnp.full(3, 1.0)):
                seen.append(model.inner.w + model.inner.b)
            seen.append(model.inner.w + model.inner.b)
        seen.append(model.inner.w)
        return seen

    (seen, _), _ = run(action)
    assert [float(s[0]) for s in seen] == [2.0, 4.0, 2.0, 1.0]


def test_tied_modules_read_the_override_too():
    def action(model, x):
        with overridden(model.inner, w=jnp.full(3, 4.0)):
            return model.tied.w

    (w, _), _ = run(action)
    np.testing.assert_array_equal(w, jnp.full(3, 4.0))


def test_jit_grad_and_vmap():
    # The overriding array is a function of the stored weight: gradients flow through it.
    def action(model, x):
        with overridden(model.inner, w=jnp.square(model.inner.w) * 3.0):
            return model.inner(x).sum()

    init_fn, apply_fn = mx.transform(Outer())
    variables = init_fn(jax.random.key(0))
    variables["params"]["inner"]["w"] = jnp.array([1.0, 2.0, 3.0])

    def loss(params, x):
        return apply_fn({**variables, "params": params}, None, action, x)[0]

    x = jnp.array([1.0, -1.0, 2.0])
    grads = jax.jit(jax.grad(loss))(variables["params"], x)
    np.testing.assert_allclose(grads["inner"]["w"], 6.0 * variables["params"]["inner"]["w"] * x)
    batched = jax.jit(jax.vmap(loss, in_axes=(None, 0)))(variables["params"], jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(
        batched, [loss(variables["params"], x), loss(variables["params"], 2 * x)]
    )


def test_outside_apply_fn():
    with pytest.raises(errors.ApplyContextError, match=r"overridden\(Scaled, w\).*inside a method"):
        with overridden(Scaled(), w=jnp.ones(3)):
            pass
    # A module of a snapshot that is not running any more.
    (escaped, _), _ = run(lambda model, x: model.inner)
    with pytest.raises(errors.ApplyContextError, match="Scaled at 'inner'.*outside apply_fn"):
        with overridden(escaped, w=jnp.ones(3)):
            pass


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("size", r"'size' is no variable.*\['b', 'calls', 'w'\]"),
        ("missing", "'missing' is no variable"),
        ("pair", "'pair' holds variables in a container"),
    ],
)
def test_names_that_are_not_one_variable(name, match):
    def action(model, x):
        with overridden(model.inner, **{name: jnp.ones(3)}):
            pass

    with pytest.raises(errors.ImmutableModuleError, match=match) as info:
        run(action)
    assert "Scaled at 'inner'" in str(info.value)


def test_mutable_state_and_wrong_shape():
    def override(**values):
        def action(model, x):
            with overridden(model.inner, **values):
                pass

        return action

    with pytest.raises(errors.ImmutableModuleError, match=r"'inner'\.calls.*mutable State.*Assign"):
        run(override(calls=jnp.array(0)))
    with pytest.raises(errors.VariableShapeError, match=r"params/inner/w.*\(3,\).*\(2,\)"):
        run(override(w=jnp.ones(2)))


def test_a_refused_override_changes_nothing():
    def action(model, x):
        with pytest.raises(errors.VariableShapeError):
            with overridden(model.inner, b=jnp.ones(3), w=jnp.ones(4)):
                pass
        return model.inner.b

    (b, _), _ = run(action)
    np.testing.assert_array_equal(b, jnp.zeros(3))
