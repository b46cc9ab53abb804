"""Sequential, MLP, Identity, Lambda and Flatten: paths, list operations, equality with
hand-written code, PyTorch parity and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.nn.activations import PReLU
from metoryx.nn.containers import MLP, Flatten, Identity, Lambda, Sequential


def _shapes(init_fn):
    return jax.tree.map(jnp.shape, jax.eval_shape(init_fn, jax.random.key(0)))


def _dense(params, x):
    with jax.numpy_rank_promotion("allow"):
        return x @ params["kernel"] + params["bias"]


X = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)

# ---------------------------------------------------------------------------------------------
# Sequential


def test_sequential_paths():
    model = Sequential(mx.Dense(3, 4), mx.relu, Sequential(mx.Dense(4, 2, use_bias=False)))
    assert _shapes(mx.transform(model).init) == {
        "params": {
            "layers": {
                "0": {"kernel": (3, 4), "bias": (4,)},
                "2": {"layers": {"0": {"kernel": (4, 2)}}},
            }
        }
    }
    text = repr(model)
    assert "(layers/0): Dense(" in text and "(layers/2): Sequential(" in text
    assert "layers/1=relu" in text  # functions are named in the configuration line


def test_sequential_list_operations():
    a, b, c = mx.Dense(3, 4), mx.Dense(4, 4), mx.Dense(4, 2)
    model = Sequential(a, mx.relu, b)
    assert len(model) == 3 and list(model) == [a, mx.relu, b]
    assert model[0] is a and model[-1] is b
    tail = model[1:]
    assert isinstance(tail, Sequential) and tail.layers == [mx.relu, b]
    assert tail[1] is b  # the same object, not a copy
    model.append(c)
    assert model.layers == [a, mx.relu, b, c]
    model.insert(3, mx.tanh)
    assert model.layers == [a, mx.relu, b, mx.tanh, c]
    model[3] = mx.gelu
    assert model[3] is mx.gelu
    model[1:3] = [mx.silu]
    assert model.layers == [a, mx.silu, mx.gelu, c]
    del model[-1]
    assert model.layers == [a, mx.silu, mx.gelu]
    assert tail.layers == [mx.relu, b]  # edits of the model leave the slice alone


def test_sequential_slice_shares_variables(numpy_init):
    class TwoViews(mx.Module):
        def __init__(self):
            self.full = Sequential(mx.Dense(3, 4), mx.relu, mx.Dense(4, 2))
            self.tail = self.full[1:]

        def __call__(self, x):
            return self.full(x), self.tail(self.full[0](x))

    init_fn, apply_fn = mx.transform(TwoViews())
    variables = numpy_init(init_fn)
    assert list(variables["params"]) == ["full"]  # the tail's Dense is tied to full/layers/2
    (full, split), _ = apply_fn(variables, None, X)
    np.testing.assert_array_equal(full, split)


def test_sequential_equals_hand_written(numpy_init, jitted_equations):
    model = Sequential(mx.Dense(3, 8), mx.relu, mx.Dense(8, 8), Lambda(jnp.tanh), mx.Dense(8, 2))
    init_fn, apply_fn = mx.transform(model)
    variables = numpy_init(init_fn)

    def hand_written(variables, x):
        p = variables["params"]["layers"]
        return _dense(p["4"], jnp.tanh(_dense(p["2"], mx.relu(_dense(p["0"], x)))))

    expected = hand_written(variables, X)
    y, new_variables = apply_fn(variables, None, X)
    np.testing.assert_array_equal(y, expected)
    assert new_variables is variables
    y_jit, _ = jax.jit(apply_fn)(variables, None, X)
    # Jitted, XLA may fuse and sum otherwise than the eager operations: 3 layers of up to
    # 8-term dots, the bias and the activations, within tests/_tolerance.py's bound.
    assert_close(y_jit, expected, n=24)
    # The container adds nothing to the compiled program. (Printed, because the snapshot's
    # relu is a deep copy of jax.nn.relu: equal equations, another custom_jvp object.)
    ours = jitted_equations(lambda v, x: apply_fn(v, None, x)[0], variables, X)
    theirs = jitted_equations(hand_written, variables, X)
    assert [(name, str(params)) for name, params in ours] == [
        (name, str(params)) for name, params in theirs
    ]


def test_sequential_indexing_inside_apply(numpy_init):
    class Head(mx.Module):
        def __init__(self):
            self.body = Sequential(mx.Dense(3, 4), mx.relu, mx.Dense(4, 2))

        def __call__(self, x):
            assert len(self.body) == 3
            return self.body[1:](self.body[0](x)), [
                isinstance(layer, mx.Dense) for layer in self.body
            ]

    init_fn, apply_fn = mx.transform(Head())
    variables = numpy_init(init_fn)
    (y, names), _ = apply_fn(variables, None, X)
    p = variables["params"]["body"]["layers"]
    np.testing.assert_array_equal(y, _dense(p["2"], mx.relu(_dense(p["0"], X))))
    assert names == [True, False, True]


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.append(mx.relu),
        lambda s: s.insert(0, mx.relu),
        lambda s: s.__setitem__(0, mx.relu),
        lambda s: s.__delitem__(0),
    ],
)
def test_sequential_is_frozen_inside_apply(numpy_init, edit):
    class Editing(mx.Module):
        def __init__(self):
            self.body = Sequential(mx.Dense(3, 2))

        def __call__(self, x):
            edit(self.body)
            return x

    init_fn, apply_fn = mx.transform(Editing())
    with pytest.raises(mx.errors.ImmutableModuleError) as info:
        apply_fn(numpy_init(init_fn), None, X)
    assert "'layers'" in str(info.value) and "Sequential at 'body'" in str(info.value)


def test_sequential_snapshot_ignores_later_edits():
    model = Sequential(mx.relu)
    _, apply_fn = mx.transform(model)
    model.append(lambda x: x + 1)
    np.testing.assert_array_equal(apply_fn({}, None, X)[0], mx.relu(X))


def test_empty_sequential_returns_input():
    _, apply_fn = mx.transform(Sequential())
    assert apply_fn({}, None, X)[0] is X


@pytest.mark.parametrize(
    "build",
    [
        lambda: Sequential(mx.Dense(2, 2), 3),
        lambda: Sequential(mx.relu).append("relu"),
        lambda: Sequential(mx.relu).insert(0, None),
        lambda: Sequential(mx.relu).__setitem__(0, 1.5),
    ],
)
def test_sequential_rejects_non_callables(build):
    with pytest.raises(mx.errors.LayerConfigError, match="cannot be called") as info:
        build()
    assert "mx.relu" in str(info.value)


def test_sequential_of_one_list():
    with pytest.raises(mx.errors.LayerConfigError, match=r"Sequential\(\*layers\)"):
        Sequential([mx.Dense(2, 2), mx.relu])


# ---------------------------------------------------------------------------------------------
# MLP


def test_mlp_paths_and_shapes(numpy_init):
    assert _shapes(mx.transform(MLP(3, [8, 6], 2)).init) == {
        "params": {
            "layers": {
                "0": {"kernel": (3, 8), "bias": (8,)},
                "1": {"kernel": (8, 6), "bias": (6,)},
                "2": {"kernel": (6, 2), "bias": (2,)},
            }
        }
    }
    assert _shapes(mx.transform(MLP(3, [], 2, use_bias=False)).init) == {
        "params": {"layers": {"0": {"kernel": (3, 2)}}}
    }
    init_fn, apply_fn = mx.transform(MLP(3, (5,), 2))
    assert apply_fn(numpy_init(init_fn), None, jnp.ones((2, 7, 3)))[0].shape == (2, 7, 2)


def test_mlp_arguments_reach_every_dense(numpy_init):
    ones, half = mx.initializers.ones, mx.initializers.constant(0.5)
    model = MLP(3, [4], 2, kernel_init=ones, bias_init=half, param_dtype=jnp.bfloat16)
    params = mx.transform(model).init(jax.random.key(0))["params"]["layers"]
    for layer in params.values():
        assert layer["kernel"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(layer["kernel"].astype(jnp.float32), 1.0)
        np.testing.assert_array_equal(layer["bias"].astype(jnp.float32), 0.5)
    _, apply_fn = mx.transform(MLP(3, [4], 2, dtype=jnp.bfloat16))
    y, _ = apply_fn(numpy_init(mx.transform(MLP(3, [4], 2)).init), None, X)
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("activation", [mx.relu, jnp.tanh])
def test_mlp_equals_hand_written(numpy_init, activation):
    init_fn, apply_fn = mx.transform(MLP(3, [8, 6], 2, activation=activation, dropout_rate=0.5))
    variables = numpy_init(init_fn)
    p = variables["params"]["layers"]
    expected = _dense(p["2"], activation(_dense(p["1"], activation(_dense(p["0"], X)))))
    np.testing.assert_array_equal(apply_fn(variables, None, X)[0], expected)  # evaluation
    # The same arrays as a Sequential of the same Dense layers, the activation in between.
    seq = Sequential(mx.Dense(3, 8), activation, mx.Dense(8, 6), activation, mx.Dense(6, 2))
    seq_vars = {"params": {"layers": {"0": p["0"], "2": p["1"], "4": p["2"]}}}
    np.testing.assert_array_equal(mx.transform(seq).apply(seq_vars, None, X)[0], expected)


def test_mlp_dropout_only_in_training(numpy_init):
    init_fn, apply_fn = mx.transform(MLP(3, [64], 2, dropout_rate=0.5))
    apply_fn = jax.jit(apply_fn, static_argnames="is_training")
    variables = numpy_init(init_fn)
    evaluation, _ = apply_fn(variables, None, X)
    with pytest.raises(mx.errors.MissingRngError) as info:
        apply_fn(variables, None, X, is_training=True)
    assert "dropout" in str(info.value) and "MLP" in str(info.value)
    first, _ = apply_fn(variables, jax.random.key(0), X, is_training=True)
    again, _ = apply_fn(variables, jax.random.key(0), X, is_training=True)
    other, _ = apply_fn(variables, jax.random.key(1), X, is_training=True)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, evaluation) and not np.allclose(first, other)
    # By hand: the hidden activation, dropped with the key apply_fn derives, then the last layer.
    p = variables["params"]["layers"]

    class Hand(mx.Module):
        def __call__(self, x):
            return _dense(p["1"], mx.dropout(mx.relu(_dense(p["0"], x)), 0.5, True))

    by_hand, _ = jax.jit(mx.transform(Hand()).apply)({}, jax.random.key(0), X)
    assert_close(first, by_hand, n=16)  # eager against jitted: 2 layers of 3- and 8-term dots


def test_mlp_no_dropout_without_rate_or_hidden_layers(numpy_init):
    for model in [MLP(3, [8], 2), MLP(3, [], 2, dropout_rate=0.5)]:
        init_fn, apply_fn = mx.transform(model)
        variables = numpy_init(init_fn)
        y, _ = apply_fn(variables, None, X, is_training=True)  # no key needed
        np.testing.assert_array_equal(y, apply_fn(variables, None, X)[0])


def test_mlp_module_activation_is_shared(numpy_init):
    init_fn, apply_fn = mx.transform(MLP(3, [4, 4], 2, activation=PReLU()))
    assert _shapes(init_fn)["params"]["activation"] == {"weight": (1,)}
    variables = numpy_init(init_fn)
    p = variables["params"]

    def prelu(x):
        return jnp.where(x > 0, x, p["activation"]["weight"][0] * x)

    layers = p["layers"]
    expected = _dense(layers["2"], prelu(_dense(layers["1"], prelu(_dense(layers["0"], X)))))
    assert_close(apply_fn(variables, None, X)[0], expected, n=16)  # 3 layers, 3 to 4 terms


def test_mlp_matches_torch(torch, assert_matches_torch):
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.ReLU()
    )
    net.append(torch.nn.Linear(6, 3))
    linears = [net[0], net[2], net[4]]
    params = [t for linear in linears for t in (linear.weight, linear.bias)]
    _, apply_fn = mx.transform(MLP(5, [8, 6], 3))

    def ours(x, *params):
        layers = {str(i): {"kernel": params[2 * i], "bias": params[2 * i + 1]} for i in range(3)}
        return apply_fn({"params": {"layers": layers}}, None, x)[0]

    def theirs(x, *params):
        for i in range(3):
            x = torch.nn.functional.linear(x, params[2 * i], params[2 * i + 1])
            x = torch.relu(x) if i < 2 else x
        return x

    x = torch.randn(2, 4, 5)
    np.testing.assert_allclose(theirs(x, *params).detach(), net(x).detach(), rtol=0, atol=0)
    assert_matches_torch(ours, theirs, [x, *params], layouts=[None, *[(1, 0), None] * 3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_sizes": 64}, "hidden_sizes=[64]"),
        ({"hidden_sizes": "64"}, "hidden_sizes=[64]"),
        ({"hidden_sizes": [8, 0]}, "`hidden_sizes[1]` must be a positive int"),
        ({"in_size": 0}, "`in_size` must be a positive int"),
        ({"out_size": 2.5}, "`out_size` must be a positive int"),
        ({"activation": "relu"}, "mx.relu"),
        ({"dropout_rate": 1.5}, "`dropout_rate` must be a finite number in [0, 1]"),
    ],
)
def test_mlp_bad_arguments(kwargs, message):
    arguments = {"in_size": 3, "hidden_sizes": [8], "out_size": 2, **kwargs}
    with pytest.raises(mx.errors.LayerConfigError) as info:
        MLP(**arguments)
    assert str(info.value).startswith("MLP: ") and message in str(info.value)


def test_mlp_wrong_input_size(numpy_init):
    init_fn, apply_fn = mx.transform(MLP(3, [4], 2))
    with pytest.raises(mx.errors.InputShapeError, match="Dense at 'layers/0'"):
        apply_fn(numpy_init(init_fn), None, jnp.ones((2, 5)))


def test_mlp_repr():
    assert MLP(3, [4], 2, dropout_rate=0.1).extra_repr() == (
        "in_size=3, hidden_sizes=(4,), out_size=2, activation=relu, dropout_rate=0.1"
    )


# ---------------------------------------------------------------------------------------------
# Identity and Lambda


def test_identity():
    init_fn, apply_fn = mx.transform(Identity())
    assert init_fn(jax.random.key(0)) == {}
    assert apply_fn({}, None, X)[0] is X
    assert jax.jit(apply_fn)({}, None, X)[0].shape == X.shape


def test_lambda():
    init_fn, apply_fn = mx.transform(Lambda(lambda x, y=1.0, *, scale: (x + y) * scale))
    assert init_fn(jax.random.key(0)) == {}
    y, _ = jax.jit(apply_fn)({}, None, X, 2.0, scale=3.0)
    np.testing.assert_allclose(y, (X + 2.0) * 3.0)
    assert Lambda(jnp.tanh).extra_repr() == "fn=tanh"


def test_lambda_does_not_own_the_modules_it_uses():
    inner = mx.Dense(3, 2)
    # Held directly, a module is an attribute like any other: its variables are the Lambda's.
    assert _shapes(mx.transform(Lambda(inner)).init) == {
        "params": {"fn": {"kernel": (3, 2), "bias": (2,)}}
    }
    # Reached through a closure, the module is invisible: it has no variables in the model.
    init_fn, _ = mx.transform(Lambda(lambda x: inner(x)))
    assert init_fn(jax.random.key(0)) == {}


def test_lambda_rejects_non_callables():
    with pytest.raises(mx.errors.LayerConfigError, match="`fn` must be a function"):
        Lambda(3)


# ---------------------------------------------------------------------------------------------
# Flatten

FLATTEN_CASES = [
    ((2, 3, 4, 5), 1, -1),
    ((2, 3, 4, 5), 0, -1),
    ((2, 3, 4, 5), 1, 2),
    ((2, 3, 4, 5), -3, -2),
    ((2, 3, 4, 5), 1, -2),
    ((2, 3, 4, 5), -2, 3),
    ((2, 3, 4, 5), 2, 2),
    ((2, 0, 4), 1, -1),
    ((6,), 0, -1),
    ((), 0, -1),
    ((), -1, 0),
]


@pytest.mark.parametrize("shape, start, end", FLATTEN_CASES)
def test_flatten_matches_torch(torch, shape, start, end):
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    expected = torch.nn.Flatten(start, end)(torch.from_numpy(x)).numpy()
    y, _ = mx.transform(Flatten(start, end)).apply({}, None, jnp.asarray(x))
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


def test_flatten():
    _, apply_fn = mx.transform(Flatten())
    x = jnp.arange(24.0).reshape(2, 3, 4)
    y, _ = jax.jit(apply_fn)({}, None, x)
    np.testing.assert_array_equal(y, np.arange(24.0).reshape(2, 12))
    assert apply_fn({}, None, jnp.ones((2, 3)))[0].shape == (2, 3)
    _, apply_fn = mx.transform(Flatten(1, 1))
    assert apply_fn({}, None, x)[0] is x  # nothing to merge: no reshape
    assert apply_fn({}, None, np.ones((2, 3)))[0].shape == (2, 3)  # NumPy input
    assert Flatten(0, -2).extra_repr() == "start_axis=0, end_axis=-2"


class _Net(mx.Module):
    def __init__(self, flatten):
        self.flat = flatten

    def __call__(self, x):
        return self.flat(x)


@pytest.mark.parametrize(
    "flatten, shape, message",
    [
        (Flatten(), (4,), "[-1, 0] for its shape (4,)"),
        (Flatten(3), (2, 3), "[-2, 1] for its shape (2, 3)"),
        (Flatten(0, -4), (2, 3), "end_axis=-4 must be axes"),
        (Flatten(1, -3), (2, 3, 4), "start_axis=1 is axis 1, after end_axis=-3 (axis 0)"),
    ],
)
def test_flatten_bad_input(flatten, shape, message):
    with pytest.raises(mx.errors.InputShapeError) as info:
        mx.transform(_Net(flatten)).apply({}, None, jnp.ones(shape))
    assert str(info.value).startswith("Flatten at 'flat': ") and message in str(info.value)


@pytest.mark.parametrize(
    "axes, message",
    [
        ((2, 1), "start_axis=2 comes after end_axis=1"),
        ((-1, -2), "start_axis=-1 comes after end_axis=-2"),
        ((1.0, -1), "`start_axis` must be an int"),
        ((1, None), "`end_axis` must be an int"),
        ((True, -1), "`start_axis` must be an int"),
    ],
)
def test_flatten_bad_axes(axes, message):
    with pytest.raises(mx.errors.LayerConfigError, match=r"^Flatten: ") as info:
        Flatten(*axes)
    assert message in str(info.value)
