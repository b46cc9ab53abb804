"""Random bad arguments to every public constructor (and the public functions that take
configuration): each call either works, and the result then transforms and initializes, or
raises an error of ``metoryx.errors``. Never a raw TypeError/ValueError/AttributeError from
Python, NumPy or JAX, and nothing accepted that fails later inside JAX.

The functions that compute on data (pooling, dropout, attention, positional encodings,
activations, cond/switch) get valid data and bad configuration, called outside and inside
``apply_fn``: they raise our error or return an array. An argument annotated ``bool`` that got
anything but a bool must be refused, not read by its truthiness."""

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
    "load_state_dict": (
        mx.interop.torch.load_state_dict,
        lambda: {
            "model": _dense(),
            "state_dict": {"weight": np.ones((4, 3), np.float32), "bias": np.zeros(4, np.float32)},
            "strict": True,
            "variables": None,
        },
    ),
    "PRNGKeys": (mx.PRNGKeys, lambda: {"default": jax.random.key(0)}),
    "capture": (mx.capture, lambda: {"apply_fn": mx.apply(_Twice()), "sown": "*"}),
    "modules": (mx.modules, lambda: {"model": _Twice(), "type": mx.Dense}),
    "replace": (
        mx.replace,
        lambda: {"model": _Twice(), "where": mx.Dense, "fn": lambda path, m: mx.Dense(3, 3)},
    ),
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


def _flags(fn: Callable[..., Any]) -> set[str]:
    """The arguments annotated ``bool``: given anything but a bool, the call must raise (a
    truthy ``"no"`` taken for True is the silent mistake that bool_argument exists for)."""
    parameters = inspect.signature(fn).parameters.values()
    return {p.name for p in parameters if p.annotation in (bool, "bool")}


def _refuses(fn: Callable[..., Any], kwargs: dict[str, Any], names: list[str]) -> list[str]:
    """The flags among ``names`` that got a value that is no bool."""
    flags = _flags(fn)
    return [n for n in names if n in flags and not isinstance(kwargs[n], (bool, np.bool_))]


def _check_result(result: Any) -> None:
    """What was accepted must also transform and initialize (abstractly: no arrays made)."""
    if isinstance(result, mx.Variable):
        holder = mx.Module()
        holder.v = result
        result = holder
    if isinstance(result, mx.Module):
        init_fn, _ = mx.transform(result)
        jax.eval_shape(init_fn, jax.random.key(0))


def _ours_or_nothing(call: Callable[[], Any], what: str, refused: Any = ()) -> None:
    try:
        _check_result(call())
    except errors.MetoryxError:
        return
    except Exception as e:  # noqa: BLE001 (the point: any other exception is a bug)
        raise AssertionError(f"{what} raised a raw {type(e).__name__}: {e}") from e
    assert not refused, f"{what} took a flag that is no bool: {list(refused)}"


# A drawn dtype string such as "d" asks for float64, which JAX truncates with a warning when
# 64-bit types are off (the suite makes warnings errors): JAX's documented behaviour, no raw error.
NO_X64_WARNING = pytest.mark.filterwarnings("ignore:Explicitly requested dtype")


@NO_X64_WARNING
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
    _ours_or_nothing(lambda: fn(**kwargs), f"{name}({kwargs})", _refuses(fn, kwargs, names))


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


# Public functions that take configuration besides their data. The data (``x``, ``query``,
# ``key``, ``value``, ``positions``, the operands of cond/switch) stays valid; each example
# replaces one or two of the other arguments by bad values.
X = jnp.linspace(-1.0, 1.0, 32).reshape(1, 4, 4, 2)
Q = jnp.linspace(-1.0, 1.0, 48).reshape(2, 3, 2, 4)  # (batch, T, heads, head_dim)
KV = jnp.linspace(-1.0, 1.0, 80).reshape(2, 5, 2, 4)  # (batch, S, kv_heads, head_dim)
DATA = {"x", "query", "key", "value", "positions"}


def _window(**extra: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {"x": X, "kernel_size": (2, 2), "strides": None, "padding": "VALID", **extra}


def _cond(pred: Any, true_fn: Any, false_fn: Any) -> Any:
    return mx.cond(pred, true_fn, false_fn, X)


def _switch(index: Any, branches: Any) -> Any:
    return mx.switch(index, branches, X)


FUNCTIONS: dict[str, tuple[Callable[..., Any], Callable[[], dict[str, Any]]]] = {
    "max_pool": (mx.max_pool, _window()),
    "min_pool": (mx.min_pool, _window()),
    "avg_pool": (mx.avg_pool, _window(count_include_pad=True)),
    "adaptive_avg_pool": (mx.adaptive_avg_pool, lambda: {"x": X, "output_size": (2, 3)}),
    "global_avg_pool": (
        mx.global_avg_pool,
        lambda: {"x": X, "num_spatial_axes": 2, "keepdims": False},
    ),
    "dropout": (
        mx.dropout,
        lambda: {"x": X, "rate": 0.5, "is_training": True, "rng": jax.random.key(0)},
    ),
    "sinusoidal_embedding": (
        mx.sinusoidal_embedding,
        lambda: {
            "positions": jnp.arange(3),
            "features": 4,
            "max_timescale": 100.0,
            "dtype": jnp.float32,
        },
    ),
    "rotary_frequencies": (mx.rotary_frequencies, lambda: {"head_dim": 8, "max_timescale": 1e4}),
    "apply_rotary": (
        mx.apply_rotary,
        lambda: {"x": Q, "positions": jnp.arange(3), "max_timescale": 1e4},
    ),
    "dot_product_attention": (
        mx.dot_product_attention,
        lambda: {
            "query": Q,
            "key": KV,
            "value": KV,
            "mask": jnp.ones((3, 5), bool),
            "bias": jnp.zeros((2, 3, 5)),
            "is_causal": True,
            "causal_offset": 2,
            "scale": 0.5,
            "dropout_rate": 0.25,
            "rng": jax.random.key(0),
            "dtype": jnp.float32,
        },
    ),
    "leaky_relu": (mx.leaky_relu, lambda: {"x": X, "negative_slope": 0.1}),
    "celu": (mx.celu, lambda: {"x": X, "alpha": 0.5}),
    "elu": (mx.elu, lambda: {"x": X, "alpha": 0.5}),
    "glu": (mx.glu, lambda: {"x": X, "axis": -1}),
    "softmax": (mx.softmax, lambda: {"x": X, "axis": -1}),
    "log_softmax": (mx.log_softmax, lambda: {"x": X, "axis": -1}),
    "gelu": (mx.gelu, lambda: {"x": X, "approximate": False}),
    "cond": (_cond, lambda: {"pred": True, "true_fn": jnp.sin, "false_fn": jnp.cos}),
    "switch": (_switch, lambda: {"index": 1, "branches": [jnp.sin, jnp.cos, jnp.tanh]}),
}


# The arguments of cond/switch that hold the caller's functions.
BRANCHES = {"true_fn", "false_fn", "branches"}


def _fails_on_its_own(value: Any) -> bool:
    """Whether a callable (or one in a list of them) raises when traced on the operands by
    itself, outside metoryx (its output aside): ``object`` and ``bytes`` among the bad values
    do (``bytes`` of a concrete array works, of a traced one not)."""
    for fn in value if isinstance(value, (list, tuple)) else [value]:
        if callable(fn):
            try:
                jax.eval_shape(lambda x, fn=fn: (fn(x), None)[1], X)
            except Exception:  # noqa: BLE001 (whatever the caller's function raises)
                return True
    return False


class _Calls(mx.Module):
    """Runs a function of no arguments as its method, inside ``apply_fn``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self) -> Any:
        return self.fn()


@NO_X64_WARNING
@pytest.mark.parametrize("name", FUNCTIONS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_bad_function_arguments_get_our_error_or_an_array(name, data):
    fn, valid = FUNCTIONS[name]
    kwargs = valid()
    names = data.draw(
        st.lists(st.sampled_from(sorted(set(kwargs) - DATA)), min_size=1, max_size=2, unique=True),
        label="arguments",
    )
    for argument in names:
        kwargs[argument] = data.draw(BAD, label=argument)
    if any(_fails_on_its_own(kwargs[n]) for n in names if n in BRANCHES):
        return  # the caller's own function raises: its error propagates, as from model code
    if data.draw(st.booleans(), label="inside apply_fn"):
        apply_fn = mx.apply(_Calls(lambda: fn(**kwargs)))
        call = lambda: apply_fn({}, jax.random.key(1))[0]  # noqa: E731
    else:
        call = lambda: fn(**kwargs)  # noqa: E731
    what = f"{name}({kwargs})"
    try:
        result = call()
    except errors.MetoryxError:
        return
    except Exception as e:  # noqa: BLE001 (the point: any other exception is a bug)
        raise AssertionError(f"{what} raised a raw {type(e).__name__}: {e}") from e
    assert not _refuses(fn, kwargs, names), f"{what} took a flag that is no bool"
    if any(n in BRANCHES and callable(kwargs[n]) for n in names):
        return  # it returns what the caller's branch functions return (None too), as lax.cond
    assert isinstance(result, jax.Array), f"{what} returned {type(result).__name__}"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_valid_function_arguments_work(name):
    fn, valid = FUNCTIONS[name]
    assert isinstance(fn(**valid()), jax.Array)
