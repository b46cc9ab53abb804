"""mx.stack / mx.unstack: the stacked and the unrolled layouts of a checkpoint, both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metoryx as mx
from metoryx import errors


class Nested(mx.Module):
    """A head outside the wrappers, an ensemble in a Repeat: two stacked axes and none."""

    def __init__(self, outer, members):
        self.blocks = mx.Repeat(
            lambda: mx.vmap(
                mx.Dense(2, 2), in_axes=None, variable_axes={"params": 0}, axis_size=members
            ),
            outer,
        )
        self.head = mx.Dense(2, 1)


class NestedLists(mx.Module):
    def __init__(self, outer, members):
        self.blocks = [[mx.Dense(2, 2) for _ in range(members)] for _ in range(outer)]
        self.head = mx.Dense(2, 1)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


@settings(max_examples=8, deadline=None)
@given(outer=st.integers(1, 3), members=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_unstack_is_the_unrolled_init_and_stack_inverts_it(outer, members, seed):
    model = Nested(outer, members)
    key = jax.random.key(seed)
    stacked = mx.init(model)(key)
    unrolled = mx.unstack(model, stacked)
    expected = mx.init(NestedLists(outer, members))(key)
    assert flat(unrolled).keys() == flat(expected).keys()
    # Bit for bit: both draw the blocks' kernels as one group, in the same (row-major) order,
    # so the same program computes them.
    for path, value in flat(expected).items():
        assert flat(unrolled)[path].tobytes() == value.tobytes(), path
    assert flat(mx.stack(model, unrolled)).keys() == flat(stacked).keys()
    for path, value in flat(mx.stack(model, unrolled)).items():
        np.testing.assert_array_equal(value, flat(stacked)[path])


def test_stack_leaves_stacked_entries_alone_and_unstack_refuses_unrolled_ones():
    model = Nested(2, 3)
    stacked = mx.init(model)(jax.random.key(0))
    again = mx.stack(model, stacked)
    np.testing.assert_array_equal(
        again["params"]["blocks"]["kernel"], stacked["params"]["blocks"]["kernel"]
    )
    bad = jax.tree.map(lambda a: a[0] if a.ndim > 2 else a, stacked)
    with pytest.raises(errors.VariableShapeError, match="params/blocks/kernel is stacked"):
        mx.unstack(model, bad)


def test_stack_lists_missing_copies_and_wrong_shapes_by_path():
    model = Nested(2, 2)
    unrolled = mx.unstack(model, mx.init(model)(jax.random.key(0)))
    del unrolled["params"]["blocks"]["1"]["0"]["kernel"]
    with pytest.raises(errors.VariablesStructureError, match=r"params/blocks/1/0/kernel"):
        mx.stack(model, unrolled)
    unrolled = mx.unstack(model, mx.init(model)(jax.random.key(0)))
    unrolled["params"]["blocks"]["0"]["1"]["bias"] = jnp.zeros(3)
    with pytest.raises(errors.VariableShapeError, match=r"params/blocks/0/1/bias: expected \(2,\)"):
        mx.stack(model, unrolled)


def test_applying_an_unrolled_checkpoint_to_a_stacked_model_points_to_mx_stack():
    model = Nested(2, 2)
    unrolled = mx.init(NestedLists(2, 2))(jax.random.key(0))
    with pytest.raises(errors.VariablesStructureError, match="Missing"):
        mx.apply(model, method=lambda m: m.head.kernel)(unrolled, None)
    not_stacked = jax.tree.map(lambda a: a[0, 0] if a.ndim > 2 else a, mx.init(model)(0))
    with pytest.raises(errors.VariableShapeError, match="mx.stack"):
        mx.apply(model, method=lambda m: m.head.kernel)(not_stacked, None)


def test_stack_and_unstack_want_a_variables_dict():
    with pytest.raises(errors.VariablesStructureError, match="nested dict"):
        mx.stack(Nested(1, 1), [1, 2])
