"""Tests of metoryx/_core/paths.py: the path format that checkpoints and error messages use."""

import collections

import jax.numpy as jnp
import pytest

import metoryx as mx
from metoryx import errors
from metoryx._core.paths import (
    flatten_variables,
    key_str,
    part_problem,
    path_str,
    unflatten_variables,
)


def test_path_str_joins_with_slashes_and_names_the_root():
    assert path_str(("params", "layers", "0", "kernel")) == "params/layers/0/kernel"
    assert path_str(()) == "<root>"
    assert path_str(iter(["a"])) == "a"


@pytest.mark.parametrize(
    ("key", "part"), [("a", "a"), ("", ""), (0, "0"), (12, "12"), (-1, "-1"), (True, "True")]
)
def test_key_str_of_str_and_int_keys(key, part):
    assert key_str(key) == part


@pytest.mark.parametrize("key", [1.0, (1, 2), None, b"a", frozenset()])
def test_key_str_of_other_keys_is_none(key):
    assert key_str(key) is None


@pytest.mark.parametrize(
    ("part", "problem"), [("a/b", "'/'"), ("fc.weight", "'.'"), ("", "empty"), ("/", "'/'")]
)
def test_a_part_that_is_empty_or_holds_a_separator_has_a_problem(part, problem):
    assert problem in part_problem(part)


@pytest.mark.parametrize("part", ["kernel", "0", "-1", "a_b", "a-b", "ünïcode"])
def test_plain_names_make_parts(part):
    assert part_problem(part) is None


def test_flatten_refuses_two_keys_that_give_the_same_path():
    with pytest.raises(errors.VariablesStructureError, match="'params/1'"):
        flatten_variables({"params": {1: jnp.ones(2), "1": jnp.zeros(2)}})


def test_flatten_and_unflatten_round_trip():
    nested = {"params": {"a": {"kernel": 1, "bias": 2}, "b": 3}, "stats": {"c": {"d": {"e": 4}}}}
    flat = flatten_variables(nested)
    assert flat == {
        ("params", "a", "kernel"): 1,
        ("params", "a", "bias"): 2,
        ("params", "b"): 3,
        ("stats", "c", "d", "e"): 4,
    }
    assert unflatten_variables(flat) == nested


def test_flatten_accepts_any_mapping_and_stringifies_keys():
    nested = collections.OrderedDict(params=collections.OrderedDict({0: {"w": 1}}))
    assert flatten_variables(nested) == {("params", "0", "w"): 1}


def test_arrays_and_lists_are_leaves():
    leaf = jnp.zeros(2)
    flat = flatten_variables({"params": {"w": leaf, "l": [1, 2]}})
    assert flat[("params", "w")] is leaf and flat[("params", "l")] == [1, 2]


def test_variables_dict_uses_exactly_these_paths():
    class Net(mx.Module):
        def __init__(self):
            self.blocks = [{"attn": mx.Dense(3, 4, use_bias=False)}]
            self.norm = mx.State("batch_stats", mx.initializers.zeros, (4,))

    v = mx.init(Net())(0)
    assert set(flatten_variables(v)) == {
        ("params", "blocks", "0", "attn", "kernel"),
        ("batch_stats", "norm"),
    }
    assert unflatten_variables(flatten_variables(v)).keys() == v.keys()
