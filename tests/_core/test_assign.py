"""Tests of metoryx/_core/assign.py: back from the execution world to a model."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors


class Net(mx.Module):
    def __init__(self, classes=2):
        self.body = mx.Dense(3, 4)
        self.head = mx.Dense(4, classes)
        self.seen = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

    def __call__(self, x):
        self.seen = self.seen + x.shape[0]
        return self.head(jnp.tanh(self.body(x)))


X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
T = jnp.array([[1.0, 0.0], [0.0, 1.0]])


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def has_values(model):
    return [
        model.body.kernel.has_value,
        model.body.bias.has_value,
        model.head.kernel.has_value,
        model.seen.has_value,
    ]


def test_returns_a_modified_copy_and_leaves_the_original_untouched():
    model = Net()
    v = mx.init(model)(0)
    copy = mx.assign_variables(model, v)
    assert copy is not model and type(copy) is Net
    assert has_values(model) == [False] * 4
    assert has_values(copy) == [True] * 4
    np.testing.assert_array_equal(copy.body.kernel.value, v["params"]["body"]["kernel"])
    assert tree_equal(mx.init(copy)(123), v)  # the values are the start now, whatever the key


def test_assigned_values_are_cast_to_the_variables_dtype():
    model = Net()
    v = jax.tree.map(np.asarray, mx.init(model)(0))
    v["params"]["body"]["kernel"] = v["params"]["body"]["kernel"].astype(np.float64)
    v["counters"]["seen"] = np.float32(5.0)
    copy = mx.assign_variables(model, v)
    assert copy.body.kernel.value.dtype == jnp.float32
    assert copy.seen.value.dtype == jnp.int32 and int(copy.seen.value) == 5


def test_strict_error_lists_missing_and_unused_and_leaves_the_model_untouched():
    model = Net()
    v = mx.init(model)(0)
    del v["params"]["head"]
    v["params"]["neck"] = {"kernel": jnp.zeros((4, 4))}
    v["ema"] = {"body": {"kernel": jnp.zeros((3, 4))}}
    with pytest.raises(errors.VariablesStructureError) as info:
        mx.assign_variables(model, v)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    for path in ("params/head/kernel", "params/head/bias", "params/neck/kernel", "ema/body/kernel"):
        assert path in message
    assert "Missing (2)" in message and "Unexpected (2)" in message and "strict=False" in message
    assert has_values(model) == [False] * 4


def test_non_strict_assigns_what_fits_and_warns_with_the_lists():
    model = Net()
    v = mx.init(model)(0)
    del v["params"]["head"]
    v["params"]["neck"] = {"kernel": jnp.zeros((4, 4))}
    with pytest.warns(errors.PartialAssignmentWarning) as record:
        copy = mx.assign_variables(model, v, strict=False)
    warning = record[0].message
    assert warning.missing == ("params/head/kernel", "params/head/bias")
    assert warning.unused == ("params/neck/kernel",)
    assert "params/head/kernel" in str(warning) and "params/neck/kernel" in str(warning)
    assert has_values(copy) == [True, True, False, True]
    assert has_values(model) == [False] * 4


def test_non_strict_full_match_does_not_warn():
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mx.assign_variables(model, mx.init(model)(0), strict=False)


@pytest.mark.parametrize("strict", ["no", None, 1, np.ones(2)])
def test_strict_must_be_a_bool(strict):
    # Found by tests/test_bad_arguments.py: any truthy value meant strict, any falsy one not.
    with pytest.raises(errors.LayerConfigError, match="^assign_variables: `strict` must be True"):
        mx.assign_variables(Net(), mx.init(Net())(0), strict=strict)


def test_shape_mismatch_lists_every_path_and_leaves_the_model_untouched():
    model = Net()
    v = mx.init(model)(0)
    v["params"]["body"]["kernel"] = jnp.zeros((3, 5))
    v["params"]["head"]["bias"] = jnp.zeros((7,))
    for strict in (True, False):
        with pytest.raises(errors.VariableShapeError) as info:
            mx.assign_variables(model, v, strict=strict)
        assert isinstance(info.value, ValueError)
        message = str(info.value)
        assert "params/body/kernel: expected (3, 4), got (3, 5)" in message
        assert "params/head/bias: expected (2,), got (7,)" in message
        assert has_values(model) == [False] * 4


def test_nested_lists_as_arrays_are_accepted():
    model = mx.Dense(3, 4, use_bias=False)
    copy = mx.assign_variables(model, {"params": {"kernel": [[1.0] * 4] * 3}})
    np.testing.assert_array_equal(copy.kernel.value, np.ones((3, 4)))


@pytest.mark.parametrize("bad", [None, [1, 2], jnp.zeros(3)])
def test_variables_that_are_not_a_mapping_are_an_error(bad):
    with pytest.raises(errors.VariablesStructureError, match=type(bad).__name__):
        mx.assign_variables(Net(), bad)


def test_assigning_into_a_model_with_tied_weights_uses_the_first_path():
    class Tied(mx.Module):
        def __init__(self):
            self.a = mx.Dense(3, 3)
            self.b = self.a

    model = Tied()
    v = mx.init(model)(0)
    assert set(v["params"]) == {"a"}
    copy = mx.assign_variables(model, v)
    assert copy.b is copy.a and copy.a.kernel.has_value


def test_transfer_learning_round_trip():
    model = Net()
    init_fn, apply_fn = mx.transform(model)
    v = init_fn(0)

    @jax.jit
    def step(v):
        def loss(params):
            y, new = apply_fn({**v, "params": params}, None, X)
            return jnp.mean((y - T) ** 2), new

        grads, new = jax.grad(loss, has_aux=True)(v["params"])
        return {**new, "params": jax.tree.map(lambda p, g: p - 0.5 * g, v["params"], grads)}

    trained = v
    for _ in range(3):
        trained = step(trained)
    assert not np.array_equal(trained["params"]["body"]["kernel"], v["params"]["body"]["kernel"])
    assert int(trained["counters"]["seen"]) == 6

    tuned = mx.assign_variables(model, trained)
    tuned.head = mx.Dense(4, 5)  # a new task: a fresh head
    new_init, new_apply = mx.transform(tuned)
    fresh = new_init(1)
    assert tree_equal(fresh["params"]["body"], trained["params"]["body"])
    assert int(fresh["counters"]["seen"]) == 6
    assert fresh["params"]["head"]["kernel"].shape == (4, 5)
    # the head is the initializer's, from the new key and its path
    expected_head = mx.init(Net(5))(1)["params"]["head"]
    assert tree_equal(fresh["params"]["head"], expected_head)
    y, _ = new_apply(fresh, None, X)
    assert y.shape == (2, 5)
    # the original model is still the untrained description
    assert has_values(model) == [False] * 4
