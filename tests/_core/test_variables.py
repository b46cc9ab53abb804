"""Tests of metoryx/_core/variables.py: Parameter and State as descriptions with fixed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors


def test_parameter_is_a_description_in_params():
    p = mx.Parameter(mx.initializers.zeros, [2, 3], foo="bar")
    assert isinstance(p, mx.Variable)
    assert p.collection == "params"
    assert p.shape == (2, 3) and type(p.shape) is tuple
    assert p.dtype == jnp.float32
    assert p.mutable is False
    assert p.metadata == {"foo": "bar"}
    assert not p.has_value


def test_state_defaults_to_mutable_in_its_collection():
    s = mx.State("batch_stats", mx.initializers.ones, (4,), jnp.int32)
    assert s.collection == "batch_stats"
    assert s.mutable is True
    assert s.dtype == jnp.int32
    assert mx.State("c", mx.initializers.ones, (), mutable=False).mutable is False


def test_reprs_show_kind_collection_dtype_shape_and_flags():
    p = mx.Parameter(mx.initializers.zeros, (2, 3))
    assert repr(p) == "Parameter(float32[2, 3])"
    p.value = jnp.ones((2, 3))
    assert repr(p) == "Parameter(float32[2, 3], value fixed)"
    s = mx.State("stats", mx.initializers.zeros, (), jnp.int32, mutable=False)
    assert repr(s) == "State('stats', int32[], read-only)"


def test_value_roundtrip_and_dtype_cast():
    p = mx.Parameter(mx.initializers.zeros, (2, 2), jnp.bfloat16)
    p.value = np.arange(4, dtype=np.float64).reshape(2, 2)
    assert isinstance(p.value, jax.Array)
    assert p.value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p.value, np.float32), [[0, 1], [2, 3]])
    s = mx.State("c", mx.initializers.zeros, (3,), jnp.int32)
    s.value = [1.0, 2.0, 3.0]  # a list is fine, cast to the State's dtype
    assert s.value.dtype == jnp.int32
    assert s.has_value


def test_value_is_a_copy_of_a_numpy_array():
    held = []  # JAX on CPU aliases 64-byte aligned NumPy buffers: make sure we hit that case
    while (start := np.ones((4, 4), np.float32)).ctypes.data % 64:
        held.append(start)
    p = mx.Parameter(mx.initializers.zeros, (4, 4))
    p.value = start
    start[:] = 5.0
    np.testing.assert_array_equal(p.value, np.ones((4, 4)))


def test_value_wrong_shape_names_expected_and_got_and_keeps_old_value():
    p = mx.Parameter(mx.initializers.zeros, (2, 3))
    p.value = jnp.ones((2, 3))
    with pytest.raises(errors.VariableShapeError) as info:
        p.value = jnp.zeros((3, 2))
    assert isinstance(info.value, ValueError) and isinstance(info.value, errors.MetoryxError)
    assert "(2, 3)" in str(info.value) and "(3, 2)" in str(info.value)
    np.testing.assert_array_equal(p.value, jnp.ones((2, 3)))


def test_value_wrong_rank_and_scalar():
    p = mx.Parameter(mx.initializers.zeros, ())
    with pytest.raises(errors.VariableShapeError, match=r"\(1,\)"):
        p.value = jnp.zeros((1,))
    p.value = 3.0
    assert p.value.shape == ()


def test_none_clears_the_fixed_value():
    p = mx.Parameter(mx.initializers.zeros, (2,))
    p.value = jnp.ones(2)
    p.value = None
    assert not p.has_value
    with pytest.raises(errors.UnsetValueError):
        _ = p.value


def test_reading_unset_value_explains_init_fn():
    p = mx.Parameter(mx.initializers.zeros, (2,))
    with pytest.raises(errors.UnsetValueError) as info:
        _ = p.value
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "init_fn" in message and ".value = " in message and "float32[2]" in message


def test_fixed_value_is_what_init_returns_for_any_key_and_clearing_restores_init():
    class M(mx.Module):
        def __init__(self):
            self.w = mx.Parameter(mx.initializers.normal(1.0), (3,))

    m = M()
    m.w.value = jnp.array([1.0, 2.0, 3.0])
    for seed in (0, 1):
        np.testing.assert_array_equal(mx.init(m)(seed)["params"]["w"], [1.0, 2.0, 3.0])
    m.w.value = None
    drawn = mx.init(m)(0)["params"]["w"]
    assert not np.array_equal(drawn, [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("args", "match", "got"),
    [
        (("params", "zeroes", (2,)), "initializer", "'zeroes'"),
        (("params", 3, (2,)), "initializer", "int 3"),
        (("params", mx.initializers.zeros, (2.5,)), "shape", "(2.5,)"),
        (("params", mx.initializers.zeros, 3), "shape", "got 3"),
        (("params", mx.initializers.zeros, (2, -1)), "negative", "(2, -1)"),
        (("params", mx.initializers.zeros, (2,), "not-a-dtype"), "dtype", "'not-a-dtype'"),
        (("", mx.initializers.zeros, (2,)), "collection", "got ''"),
        ((3, mx.initializers.zeros, (2,)), "collection", "got 3"),
        (("batch/stats", mx.initializers.zeros, (2,)), "collection", "'batch/stats'"),
        (("batch.stats", mx.initializers.zeros, (2,)), "collection", "'batch.stats'"),
        (("params", mx.initializers.zeros, (2,), object), "numeric", "object"),
        (("params", mx.initializers.zeros, (2,), str), "numeric", "str"),
        (("params", mx.initializers.zeros, (2,), "U3"), "numeric", "'U3'"),
        (("params", mx.initializers.zeros, (2,), "i4,i4"), "numeric", "'i4,i4'"),
        (("params", mx.initializers.zeros, (2,), "datetime64[s]"), "numeric", "datetime64"),
        (("params", mx.initializers.zeros, (2,), ","), "numeric", "','"),
        (("params", mx.initializers.zeros, (2,), "float128"), "numeric", "'float128'"),
        (("params", mx.initializers.zeros, (2,), np.ones(2)), "numeric", "an array"),
        (("params", mx.initializers.zeros, (2,), jax.random.key(0)), "numeric", "an array"),
        (("params", mx.initializers.zeros, (2**63,)), "2\\*\\*63", "9223372036854775808"),
        (("params", mx.initializers.zeros, (2,), jnp.float32, "yes"), "mutable", "'yes'"),
    ],
)
def test_bad_descriptions_raise_variable_definition_error(args, match, got):
    with pytest.raises(errors.VariableDefinitionError, match=match) as info:
        mx.Variable(*args)
    assert isinstance(info.value, TypeError)
    assert got in str(info.value)


def test_parameter_and_state_validate_like_variable():
    with pytest.raises(errors.VariableDefinitionError, match="'zeroes'"):
        mx.Parameter("zeroes", (2,))
    with pytest.raises(errors.VariableDefinitionError, match="collection"):
        mx.State(None, mx.initializers.zeros, (2,))


@pytest.mark.parametrize("name", mx.initializers.NAMES)
def test_an_initializer_may_be_given_by_name(name):
    assert callable(mx.Parameter(name, (3, 4)).init)
    array = mx.init(mx.Dense(3, 4, kernel_init=name))(0)["params"]["kernel"]
    assert array.shape == (3, 4) and array.dtype == jnp.float32


def test_an_unknown_initializer_name_names_the_layer_argument_and_the_valid_names():
    with pytest.raises(errors.VariableDefinitionError) as info:
        mx.Conv(3, 8, (3, 3), bias_init="zero")
    message = str(info.value)
    assert message.startswith("Conv: `bias_init`")
    assert "Did you mean 'zeros'?" in message and "glorot_uniform" in message


def test_a_bad_argument_passed_on_names_the_outer_layer_too():
    with pytest.raises(errors.VariableDefinitionError) as info:
        mx.MLP(3, [4], 2, kernel_init=3)
    assert str(info.value).startswith("MLP: `kernel_init` (passed on to Dense: `kernel_init`)")


@pytest.mark.parametrize("dtype", [object, str, "U3", bytes, "datetime64[s]"])
def test_a_non_numeric_param_dtype_is_refused_naming_the_layer(dtype):
    with pytest.raises(errors.VariableDefinitionError, match="numeric") as info:
        mx.LayerNorm(4, param_dtype=dtype)
    assert str(info.value).startswith("LayerNorm: `param_dtype`")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("ab", "must hold numbers"),
        ([[1.0], [1.0, 2.0]], "does not make an array"),
        (np.array([1, "a"], dtype=object), "must hold numbers"),
        (np.array([b"a", b"b"]), "must hold numbers"),
        ([1 + 2j, 3.0], "imaginary"),
        (jnp.array([1j, 2.0]), "imaginary"),
    ],
)
def test_a_value_that_is_no_array_of_numbers_is_refused(value, match):
    p = mx.Parameter(mx.initializers.zeros, (2,))
    with pytest.raises(errors.VariableDtypeError, match=match) as info:
        p.value = value
    assert "Parameter(float32[2])" in str(info.value)
    assert not p.has_value


def test_a_complex_value_fits_a_complex_variable_and_bools_cast():
    p = mx.Parameter(mx.initializers.zeros, (2,), jnp.complex64)
    p.value = [1j, 2.0]
    assert p.value.dtype == jnp.complex64
    q = mx.Parameter(mx.initializers.zeros, (2,))
    q.value = np.array([True, False])
    np.testing.assert_array_equal(q.value, [1.0, 0.0])


def test_dtype_of_init_output_follows_the_declaration():
    class M(mx.Module):
        def __init__(self):
            self.w = mx.Parameter(mx.initializers.normal(), (2, 2), jnp.bfloat16)
            self.n = mx.State("counts", mx.initializers.zeros, (), jnp.int32)

    v = mx.init(M())(0)
    assert v["params"]["w"].dtype == jnp.bfloat16
    assert v["counts"]["n"].dtype == jnp.int32


class _Scaled(mx.Module):
    def __init__(self):
        self.scale = mx.Parameter(mx.initializers.ones, (3,))

    def __call__(self, x):
        return -self.scale * x


@pytest.mark.parametrize(
    "call",
    [
        lambda: mx.Dense(3, 4)(jnp.ones((2, 3))),  # x @ kernel: the reflected operator
        lambda: _Scaled()(jnp.ones(3)),  # unary minus, then a product
        lambda: mx.Parameter(mx.initializers.zeros, (2,))[0],
    ],
)
def test_a_variable_used_as_an_array_before_transform_says_to_transform_first(call):
    with pytest.raises(errors.ApplyContextError, match=r"definition world.*mx\.transform\(model\)"):
        call()


def test_a_variable_keeps_identity_equality_and_hashing():
    # The operators above must not reach ==/hash: models are walked by identity.
    a, b = mx.Parameter(mx.initializers.zeros, (2,)), mx.Parameter(mx.initializers.zeros, (2,))
    assert a == a and a != b and len({a, b, a}) == 2


def test_shape_and_dtype_are_read_only_descriptions():
    p = mx.Parameter(mx.initializers.zeros, [2, 3], jnp.float16)
    assert p.shape == (2, 3) and p.dtype == jnp.float16
    with pytest.raises(AttributeError):
        p.shape = (3, 2)


def test_tags_are_sorted_unique_and_settable():
    p = mx.Parameter(mx.initializers.zeros, (2, 3), tags=("b", "a", "b"))
    assert p.tags == ("a", "b")
    p.tags = "backbone"  # one str is one tag, not its letters
    assert p.tags == ("backbone",)
    p.tags = ()
    assert p.tags == ()
    assert mx.State("s", mx.initializers.zeros, (), tags="stats").tags == ("stats",)


@pytest.mark.parametrize("bad", [1, ("a", 2), ("",), ["ok", None], {"a": 1}])
def test_bad_tags_are_refused_with_the_variable_named(bad):
    p = mx.Parameter(mx.initializers.zeros, (2,))
    with pytest.raises(errors.VariableDefinitionError, match=r"Parameter\(float32\[2\]\): tags"):
        p.tags = bad


def test_axes_name_each_dimension_or_none():
    p = mx.Parameter(mx.initializers.zeros, (2, 3), axes=("embed", None))
    assert p.axes == ("embed", None)
    p.axes = ["embed", "mlp"]
    assert p.axes == ("embed", "mlp")
    p.axes = None
    assert p.axes is None


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (("embed",), "names 1 dimensions"),
        ("embed", "must be None or a tuple"),
        (("", "x"), "non-empty"),
    ],
)
def test_bad_axes_are_refused(bad, match):
    with pytest.raises(errors.VariableDefinitionError, match=match):
        mx.Parameter(mx.initializers.zeros, (2, 3), axes=bad)
