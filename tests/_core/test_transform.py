"""Tests of metoryx/_core/transform.py: the snapshot, methods, init_fn, apply_fn, validation."""

import collections
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx import errors


class MLP(mx.Module):
    def __init__(self, sizes=(3, 4, 2)):
        super().__init__()
        self.layers = [mx.Dense(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)

    def first(self, x):
        return self.layers[0](x)


class Stateful(mx.Module):
    """A Dense plus a step counter and a running mean: mutable State next to Parameters."""

    def __init__(self):
        self.dense = mx.Dense(3, 4)
        self.steps = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.mean = mx.State("batch_stats", mx.initializers.zeros, (4,))

    def __call__(self, x):
        y = self.dense(x)
        self.steps = self.steps + 1
        self.mean = 0.5 * self.mean + 0.5 * jnp.mean(y, axis=0)
        return y


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


# ---------------------------------------------------------------------------------------------
# The bridge


def test_transform_returns_a_named_tuple_and_init_apply_shortcuts_agree():
    model = MLP()
    t = mx.transform(model)
    assert isinstance(t, mx.Transformed) and isinstance(t, tuple)
    assert t.init is t[0] and t.apply is t[1]
    v = t.init(0)
    assert tree_equal(mx.init(model)(0), v)
    y, _ = mx.apply(model)(v, None, X)
    np.testing.assert_array_equal(y, t.apply(v, None, X)[0])


def test_snapshot_isolation_from_later_edits():
    model = MLP()
    model.layers[0].kernel.value = jnp.ones((3, 4))
    init_fn, apply_fn = mx.transform(model)
    v0 = init_fn(0)
    y0, _ = apply_fn(v0, None, X)

    model.layers[0].kernel.value = jnp.zeros((3, 4))  # edit a fixed value
    model.layers[1].bias.value = jnp.full((2,), 9.0)  # fix a new one
    model.layers[1] = mx.Dense(4, 4)  # swap a layer for another shape
    model.layers.append(mx.Dense(4, 2))  # add one
    model.layers[0].use_bias = False  # edit config
    model.__call__ = lambda x: x  # even monkeypatching the instance

    assert tree_equal(init_fn(0), v0)
    np.testing.assert_array_equal(init_fn(0)["params"]["layers"]["0"]["kernel"], jnp.ones((3, 4)))
    y1, _ = apply_fn(v0, None, X)
    np.testing.assert_array_equal(y0, y1)


def aligned_ones(shape):
    """A NumPy array with a 64-byte aligned buffer, which JAX on CPU may alias, not copy."""
    held = []  # keep the misaligned ones alive so the allocator moves on
    while (array := np.ones(shape, np.float32)).ctypes.data % 64:
        held.append(array)
    return array


def test_snapshot_isolation_from_in_place_edits_of_a_numpy_fixed_value():
    model = mx.Dense(3, 4)
    start = aligned_ones((3, 4))
    model.kernel.value = start
    init_fn, _ = mx.transform(model)
    start[:] = 5.0
    np.testing.assert_array_equal(init_fn(0)["params"]["kernel"], np.ones((3, 4)))


def test_one_deep_copy_at_transform_none_per_call(monkeypatch):
    model = Stateful()
    init_fn, apply_fn = mx.transform(model)
    v = init_fn(0)
    calls = []
    real = copy.deepcopy

    def spy(x, *args, **kwargs):
        if isinstance(x, (mx.Module, mx.Variable)):  # JAX itself deep-copies compile options
            calls.append(type(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", spy)
    for _ in range(3):
        init_fn(1)
        v = apply_fn(v, None, X)[1]
    assert calls == []
    mx.transform(model)
    assert calls == [Stateful]  # transform copies once, the whole model in one go


def test_fixed_jax_arrays_are_shared_by_the_snapshot_not_copied():
    model = mx.Dense(3, 4)
    big = jnp.arange(12.0).reshape(3, 4)
    model.kernel.value = big
    assert model.kernel.value is big  # the setter keeps the user's array when the dtype fits
    init_fn, _ = mx.transform(model)
    snapshot_values = [b.variable.value for b in init_fn.__self__.variables if b.variable.has_value]
    assert any(value is big for value in snapshot_values)


def test_init_output_can_be_donated_without_destroying_the_fixed_value():
    model = mx.Dense(3, 4)
    start = jnp.ones((3, 4))
    model.kernel.value = start
    init_fn, _ = mx.transform(model)
    v = init_fn(0)
    jax.jit(lambda v: jax.tree.map(lambda a: a + 1, v), donate_argnums=0)(v)
    np.testing.assert_array_equal(model.kernel.value, np.ones((3, 4)))
    np.testing.assert_array_equal(init_fn(0)["params"]["kernel"], np.ones((3, 4)))


def test_method_by_name_function_and_bound_methods():
    model = MLP()
    v = mx.init(model)(0)
    expected = v["params"]["layers"]["0"]
    want = X @ expected["kernel"] + expected["bias"][None, :]

    for method in ("first", lambda m, x: m.first(x), model.first, model.layers[0].__call__):
        y, new = mx.apply(model, method)(v, None, X)
        assert_close(y, want, n=4)  # a 3-term dot and the bias
        assert new is v or tree_equal(new, v)


def test_bound_method_is_rebound_to_the_snapshot():
    model = MLP()
    init_fn, apply_fn = mx.transform(model, method=model.layers[1].__call__)
    v = init_fn(0)
    model.layers[1] = mx.Dense(4, 4)  # the bound method's module was replaced: no effect
    y, _ = apply_fn(v, None, jnp.ones((1, 4)))
    assert y.shape == (1, 2)


def test_unknown_method_name_is_a_method_error_listing_methods():
    with pytest.raises(errors.MethodError) as info:
        mx.transform(MLP(), method="encode")
    assert isinstance(info.value, AttributeError)
    message = str(info.value)
    assert "'encode'" in message and "MLP" in message and "first" in message


def test_method_of_a_foreign_module_and_non_callable_are_errors():
    with pytest.raises(errors.MethodError, match="not part of"):
        mx.transform(MLP(), method=mx.Dense(4, 2).__call__)
    with pytest.raises(errors.MethodError, match="got int"):
        mx.transform(MLP(), method=3)
    with pytest.raises(errors.MethodError, match="got ndarray"):
        mx.transform(MLP(), method=np.array(["__call__", "x"]))


# ---------------------------------------------------------------------------------------------
# init_fn


def test_init_runs_no_forward_pass():
    class NoForward(mx.Module):
        def __init__(self):
            self.dense = mx.Dense(3, 4)

        def __call__(self, x):
            raise AssertionError("init_fn must not run the model")

    assert mx.init(NoForward())(0)["params"]["dense"]["kernel"].shape == (3, 4)


def test_same_key_bit_identical_different_keys_differ():
    init_fn = mx.init(MLP())
    a, b = init_fn(jax.random.key(3)), init_fn(jax.random.key(3))
    assert tree_equal(a, b)
    c = init_fn(jax.random.key(4))
    kernel = ("params", "layers", "0", "kernel")
    get = lambda v: v[kernel[0]][kernel[1]][kernel[2]][kernel[3]]  # noqa: E731
    assert not np.array_equal(get(a), get(c))


def test_int_seed_and_legacy_key():
    init_fn = mx.init(MLP())
    assert tree_equal(init_fn(7), init_fn(jax.random.key(7)))
    assert tree_equal(init_fn(np.int64(7)), init_fn(7))
    legacy = init_fn(jax.random.PRNGKey(7))
    assert jax.tree.structure(legacy) == jax.tree.structure(init_fn(7))


@pytest.mark.parametrize("key", [1.5, "seed", None, True, jnp.zeros(3), jnp.zeros((2,), jnp.int32)])
def test_bad_init_key_is_an_rngs_type_error(key):
    with pytest.raises(errors.RngsTypeError) as info:
        mx.init(MLP())(key)
    assert isinstance(info.value, TypeError)
    assert "jax.random.key" in str(info.value) and type(key).__name__ in str(info.value)


def test_editing_one_layer_leaves_the_others_bit_identical():
    model = MLP((3, 4, 4, 2))
    before = mx.init(model)(0)["params"]["layers"]
    model.layers[1] = mx.Dense(4, 4, kernel_init=mx.initializers.glorot_uniform())
    model.layers.append(mx.Dense(2, 2))
    after = mx.init(model)(0)["params"]["layers"]
    assert tree_equal(before["0"], after["0"]) and tree_equal(before["2"], after["2"])
    assert not np.array_equal(before["1"]["kernel"], after["1"]["kernel"])


def test_fifty_identical_layers_get_fifty_different_starts():
    class Tower(mx.Module):
        def __init__(self):
            self.layers = [mx.Dense(4, 4, use_bias=False) for _ in range(50)]

    kernels = mx.init(Tower())(0)["params"]["layers"]
    flat = {bytes(np.asarray(kernels[str(i)]["kernel"]).data) for i in range(50)}
    assert len(flat) == 50


def test_same_variable_start_is_independent_of_other_variables_and_their_order():
    # A uniform initializer: its bits do not depend on where in a group a draw lands (a normal
    # one's may differ in the last bit there; see mx.initializers.Initializer).
    class A(mx.Module):
        def __init__(self):
            self.x = mx.Parameter(mx.initializers.uniform(-1.0, 1.0), (4,))
            self.y = mx.Parameter(mx.initializers.uniform(-1.0, 1.0), (4,))

    class B(mx.Module):
        def __init__(self):
            self.y = mx.Parameter(mx.initializers.uniform(-1.0, 1.0), (4,))
            self.z = mx.Parameter(mx.initializers.uniform(-1.0, 1.0), (4,))

    a, b = mx.init(A())(0), mx.init(B())(0)
    np.testing.assert_array_equal(a["params"]["y"], b["params"]["y"])
    assert not np.array_equal(a["params"]["x"], a["params"]["y"])


def test_initializer_with_wrong_shape_is_a_shape_error_naming_the_path():
    model = MLP()
    model.layers[1].bias = mx.Parameter(lambda key, shape, dtype: jnp.zeros((3,), dtype), (2,))
    with pytest.raises(errors.VariableShapeError) as info:
        mx.init(model)(0)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "params/layers/1/bias" in message and "(3,)" in message and "(2,)" in message


def test_initializer_failure_is_our_error_naming_the_path_with_the_cause_chained():
    def broken(key, shape, dtype):
        raise ZeroDivisionError("boom")

    model = MLP()
    model.layers[0].kernel = mx.Parameter(broken, (3, 4))
    with pytest.raises(errors.VariableDefinitionError) as info:
        mx.init(model)(0)
    message = str(info.value)
    assert message.startswith("params/layers/0/kernel") and "ZeroDivisionError: boom" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    ("layer", "cause"),
    [
        (lambda: mx.Dense(3, 4, param_dtype=jnp.int32), "int32"),  # a float initializer
        (lambda: mx.Dense(3, 4, kernel_init=lambda key, shape, dtype: None), "None"),
        (lambda: mx.Dense(3, 4, kernel_init=len), "len()"),
        (lambda: mx.Dense(3, 4, kernel_init=object), "object()"),
    ],
)
def test_an_initializer_that_cannot_make_its_array_is_named_at_init(layer, cause):
    init_fn = mx.init(layer())
    for fn in (init_fn, jax.jit(init_fn)):
        with pytest.raises(errors.VariableDefinitionError, match="^params/kernel: its initial"):
            fn(jax.random.key(0))
    assert cause in str(pytest.raises(errors.VariableDefinitionError, init_fn, 0).value)


def test_integer_variables_start_from_the_key_free_initializers():
    layer = mx.Dense(3, 4, kernel_init="zeros", param_dtype=jnp.int32)
    assert mx.init(layer)(0)["params"]["kernel"].dtype == jnp.int32


def test_initializer_output_is_cast_to_the_declared_dtype():
    p = mx.Parameter(lambda key, shape, dtype: jnp.ones(shape, jnp.float32), (2,), jnp.bfloat16)
    model = mx.Dense(3, 4)
    model.extra = p
    assert mx.init(model)(0)["params"]["extra"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# apply_fn


def test_apply_returns_output_and_new_variables_with_the_same_structure():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    y, new = apply_fn(v, None, X)
    assert y.shape == (2, 4)
    assert jax.tree.structure(new) == jax.tree.structure(v)
    # Parameters pass through unchanged (the very same arrays), mutable State is updated.
    assert new["params"]["dense"]["kernel"] is v["params"]["dense"]["kernel"]
    assert int(new["counters"]["steps"]) == 1
    assert_close(new["batch_stats"]["mean"], 0.5 * jnp.mean(y, axis=0), n=2)
    # the input dict is not modified
    assert int(v["counters"]["steps"]) == 0
    _, newer = apply_fn(new, None, X)
    assert int(newer["counters"]["steps"]) == 2


def test_apply_without_state_returns_the_variables_unchanged():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    _, new = apply_fn(v, None, X)
    assert tree_equal(new, v)


def test_apply_accepts_numpy_arrays_and_reads_them_as_jax_arrays():
    seen = []

    class Probe(mx.Module):
        def __init__(self):
            self.w = mx.Parameter(mx.initializers.ones, (3,))

        def __call__(self):
            seen.append(type(self.w))
            return self.w

    y, _ = mx.apply(Probe())({"params": {"w": np.arange(3, dtype=np.float32)}}, None)
    assert issubclass(seen[0], jax.Array)
    np.testing.assert_array_equal(y, [0, 1, 2])


def test_ordered_dict_with_the_right_paths_works_and_keeps_its_type():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    od = collections.OrderedDict(
        (collection, collections.OrderedDict(inner)) for collection, inner in reversed(v.items())
    )
    y, new = apply_fn(od, None, X)
    np.testing.assert_array_equal(y, apply_fn(v, None, X)[0])
    assert jax.tree.structure(new) == jax.tree.structure(od)
    assert int(new["counters"]["steps"]) == 1


def _snapshot_of(v):
    return jax.tree.map(lambda a: a, v), {id(a) for a in jax.tree.leaves(v)}


def _assert_untouched(v, before):
    copy_, ids = before
    assert tree_equal(v, copy_) and {id(a) for a in jax.tree.leaves(v)} == ids


def test_missing_and_unexpected_paths_are_one_error_listing_all():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    del v["params"]["dense"]["bias"]
    del v["counters"]
    v["params"]["dense"]["weight"] = jnp.zeros((3, 4))
    v["extra"] = {"thing": jnp.zeros(())}
    before = _snapshot_of(v)
    with pytest.raises(errors.VariablesStructureError) as info:
        apply_fn(v, None, X)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert not message.startswith(("'", '"'))  # not KeyError's quoted repr
    for path in ("params/dense/bias", "counters/steps", "params/dense/weight", "extra/thing"):
        assert path in message
    assert "Missing (2)" in message and "Unexpected (2)" in message
    _assert_untouched(v, before)


def test_none_leaf_counts_as_missing():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    v["params"]["layers"]["1"]["bias"] = None
    with pytest.raises(errors.VariablesStructureError, match="params/layers/1/bias"):
        apply_fn(v, None, X)


def test_wrong_shape_names_path_expected_and_got():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    v["params"]["layers"]["1"]["kernel"] = jnp.zeros((2, 4))
    before = _snapshot_of(v)
    with pytest.raises(errors.VariableShapeError) as info:
        apply_fn(v, None, X)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "params/layers/1/kernel" in message and "(4, 2)" in message and "(2, 4)" in message
    _assert_untouched(v, before)
    with pytest.raises(errors.VariableShapeError, match="params/layers/1/kernel"):
        jax.jit(apply_fn)(v, None, X)


def test_wrong_dtype_names_path_expected_and_got():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    v["counters"]["steps"] = jnp.zeros((), jnp.float32)
    with pytest.raises(errors.VariableDtypeError) as info:
        apply_fn(v, None, X)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert "counters/steps" in message and "int32" in message and "float32" in message


def test_non_array_leaf_is_a_dtype_error_naming_the_path():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    v["params"]["layers"]["0"]["bias"] = "zeros"
    with pytest.raises(errors.VariableDtypeError) as info:
        apply_fn(v, None, X)
    assert "params/layers/0/bias" in str(info.value) and "str" in str(info.value)


@pytest.mark.parametrize("bad", [None, [1, 2], jnp.zeros(3), "params"])
def test_variables_that_are_not_a_mapping_are_an_error(bad):
    _, apply_fn = mx.transform(MLP())
    with pytest.raises(errors.VariablesStructureError) as info:
        apply_fn(bad, None, X)
    assert type(bad).__name__ in str(info.value) and "init_fn" in str(info.value)


def test_model_without_variables_takes_an_empty_dict():
    class Double(mx.Module):
        def __call__(self, x):
            return 2 * x

    init_fn, apply_fn = mx.transform(Double())
    assert init_fn(0) == {}
    y, new = apply_fn({}, None, jnp.ones(2))
    np.testing.assert_array_equal(y, [2, 2])
    assert new == {}
