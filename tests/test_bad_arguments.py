"""Random bad arguments to every public constructor (and the public functions that take
configuration): each call either works, and the result then transforms and initializes, or
raises an error of ``metoryx.errors``. Never a raw TypeError/ValueError/AttributeError from
Python, NumPy or JAX, and nothing accepted that fails later inside JAX."""

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metoryx as mx
from metoryx import errors

EXAMPLES = 25

# Values of the wrong type or range for most arguments: strings (initializer and dtype names
# among them), None, non-positive and huge ints, floats for ints, bools, lists, dtypes that
# no array holds, arrays, callables that are not what is asked for.
BAD = st.one_of(
    st.text(max_size=4),
    st.sampled_from(["zeros", "float32", "SAME", "concat", "params", "a/b", "a.b", ""]),
    st.none(),
    st.booleans(),
    st.integers(-3, 0),
    st.sampled_from([2**70, -(2**70), 7]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.lists(st.one_of(st.integers(-2, 3), st.text(max_size=2), st.none()), max_size=3),
    st.tuples(st.integers(-2, 3), st.floats(-2, 3)),
    st.sampled_from(
        [
            object,
            str,
            bytes,
            np.dtype(object),
            "float33",
            "U3",
            b"x",
            (),
            {},
            {"a": 1},
            {"params": "x"},
            {1: 0},
            np.array(["a"]),
            np.array([1, "a"], dtype=object),
            np.ones(2),
            jnp.ones((2, 2)),
            1.5,
            1j,
            len,
            lambda *a: None,
            jax.random.key(0),
        ]
    ),
)


def _dense() -> mx.Module:
    return mx.Dense(3, 4)


class _Twice(mx.Module):
    def __init__(self) -> None:
        self.fc = mx.Dense(3, 3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(x)


# name: (callable, the valid arguments it is called with, made afresh for each example).
# Each example replaces one or two of the callable's arguments by bad values.
CONSTRUCTORS: dict[str, tuple[Callable[..., Any], Callable[[], dict[str, Any]]]] = {
    "Dense": (mx.Dense, lambda: {"in_size": 3, "out_size": 4}),
    "Einsum": (mx.Einsum, lambda: {"spec": "bi,io->bo", "shape": (3, 4), "bias_shape": (4,)}),
    "Embed": (mx.Embed, lambda: {"num_embeddings": 5, "features": 3}),
    "Conv": (mx.Conv, lambda: {"in_size": 2, "out_size": 4, "kernel_size": (3, 3)}),
    "ConvTranspose": (
        mx.ConvTranspose,
        lambda: {"in_size": 2, "out_size": 4, "kernel_size": (3, 3)},
    ),
    "BatchNorm": (mx.BatchNorm, lambda: {"size": 3}),
    "LayerNorm": (mx.LayerNorm, lambda: {"size": 3}),
    "RMSNorm": (mx.RMSNorm, lambda: {"size": 3}),
    "GroupNorm": (mx.GroupNorm, lambda: {"num_groups": 1, "size": 3}),
    "InstanceNorm": (mx.InstanceNorm, lambda: {"size": 3}),
    "PReLU": (mx.PReLU, lambda: {"size": 3}),
    "Dropout": (mx.Dropout, lambda: {"rate": 0.5}),
    "Flatten": (mx.Flatten, lambda: {}),
    "Lambda": (mx.Lambda, lambda: {"fn": jnp.tanh}),
    "MLP": (mx.MLP, lambda: {"in_size": 3, "hidden_sizes": [4], "out_size": 2}),
    "MultiHeadAttention": (mx.MultiHeadAttention, lambda: {"num_heads": 2, "in_size": 4}),
    "RotaryEmbedding": (mx.RotaryEmbedding, lambda: {}),
    "SimpleRNNCell": (mx.SimpleRNNCell, lambda: {"in_size": 2, "hidden_size": 3}),
    "GRUCell": (mx.GRUCell, lambda: {"in_size": 2, "hidden_size": 3}),
    "LSTMCell": (mx.LSTMCell, lambda: {"in_size": 2, "hidden_size": 3}),
    "RNN": (mx.RNN, lambda: {"cell": mx.GRUCell(2, 3)}),
    "Bidirectional": (
        mx.Bidirectional,
        lambda: {
            "forward": mx.RNN(mx.GRUCell(2, 3)),
            "backward": mx.RNN(mx.GRUCell(2, 3), reverse=True),
        },
    ),
    "WeightNorm": (mx.WeightNorm, lambda: {"layer": _dense()}),
    "SpectralNorm": (mx.SpectralNorm, lambda: {"layer": _dense()}),
    "Repeat": (mx.Repeat, lambda: {"layer": lambda: mx.Dense(3, 3), "n": 2}),
    "scan": (mx.scan, lambda: {"module": mx.GRUCell(2, 2), "length": 2}),
    "vmap": (mx.vmap, lambda: {"module": _dense()}),
    "checkpoint": (mx.checkpoint, lambda: {"module_or_fn": _dense()}),
    "Parameter": (mx.Parameter, lambda: {"init": mx.initializers.zeros, "shape": (2,)}),
    "State": (
        mx.State,
        lambda: {"collection": "stats", "init": mx.initializers.zeros, "shape": (2,)},
    ),
    "Variable": (
        mx.Variable,
        lambda: {"collection": "stats", "init": mx.initializers.zeros, "shape": (2,)},
    ),
    "transform": (mx.transform, lambda: {"model": _Twice(), "method": None}),
    "assign_variables": (
        mx.assign_variables,
        lambda: {"model": _dense(), "variables": mx.init(_dense())(0), "strict": True},
    ),
    "PRNGKeys": (mx.PRNGKeys, lambda: {"default": jax.random.key(0)}),
    "capture": (mx.capture, lambda: {"apply_fn": mx.apply(_Twice()), "sown": "*"}),
    "stack": (mx.stack, lambda: {"model": _stacked(), "variables": _unrolled_variables()}),
    "unstack": (mx.unstack, lambda: {"model": _stacked(), "variables": mx.init(_stacked())(0)}),
}

# Constructors that take their parts as *args: one part is replaced by a bad value.
VARIADIC: dict[str, tuple[Callable[..., Any], Callable[[], list[Any]]]] = {
    "Sequential": (mx.Sequential, lambda: [mx.Dense(3, 3), mx.relu]),
    "StackedRNN": (mx.StackedRNN, lambda: [mx.RNN(mx.GRUCell(2, 3)), mx.RNN(mx.GRUCell(3, 3))]),
}


def _stacked() -> mx.Module:
    return mx.Repeat(lambda: mx.Dense(3, 3), 2)


def _unrolled_variables() -> dict[str, Any]:
    layer = mx.init(mx.Dense(3, 3))(0)["params"]
    return {"params": {"0": layer, "1": layer}}


def _parameters(fn: Callable[..., Any]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def _check_result(result: Any) -> None:
    """What was accepted must also transform and initialize (abstractly: no arrays made)."""
    if isinstance(result, mx.Variable):
        holder = mx.Module()
        holder.v = result
        result = holder
    if isinstance(result, mx.Module):
        init_fn, _ = mx.transform(result)
        jax.eval_shape(init_fn, jax.random.key(0))


def _ours_or_nothing(call: Callable[[], Any], what: str) -> None:
    try:
        _check_result(call())
    except errors.MetoryxError:
        pass
    except Exception as e:  # noqa: BLE001 (the point: any other exception is a bug)
        raise AssertionError(f"{what} raised a raw {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("name", CONSTRUCTORS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_bad_arguments_get_our_error_or_work(name, data):
    fn, valid = CONSTRUCTORS[name]
    kwargs = valid()
    names = data.draw(
        st.lists(st.sampled_from(_parameters(fn)), min_size=1, max_size=2, unique=True),
        label="arguments",
    )
    for argument in names:
        kwargs[argument] = data.draw(BAD, label=argument)
    _ours_or_nothing(lambda: fn(**kwargs), f"{name}({kwargs})")


@pytest.mark.parametrize("name", VARIADIC)
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_bad_parts_get_our_error_or_work(name, data):
    fn, valid = VARIADIC[name]
    parts = valid()
    index = data.draw(st.integers(0, len(parts)), label="index")
    bad = data.draw(BAD, label="part")
    parts = [*parts[:index], bad, *parts[index + 1 :]]
    keywords = {}
    if name == "StackedRNN" and data.draw(st.booleans(), label="bad dropout_rate"):
        keywords["dropout_rate"] = data.draw(BAD, label="dropout_rate")
    _ours_or_nothing(lambda: fn(*parts, **keywords), f"{name}(*{parts}, **{keywords})")


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_the_valid_arguments_work(name):
    fn, valid = CONSTRUCTORS[name]
    _check_result(fn(**valid()))
