"""Recurrent cells, RNN, Bidirectional and StackedRNN: PyTorch parity (weights moved with
load_state_dict, parameter gradients compared through to_state_dict), padded batches against
running each sequence alone, one scan in the program, transformations, dtypes and errors."""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.interop.torch import load_state_dict, to_state_dict
from metoryx.nn import recurrent
from metoryx.nn.recurrent import (
    HOISTED_MAX_ROWS,
    RNN,
    Bidirectional,
    GRUCell,
    LSTMCell,
    SimpleRNNCell,
    StackedRNN,
)

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
B, T, IN, H = 2, 5, 3, 4
# Two programs of the same recurrence (other shapes, padded or alone, unrolled, batched) sum and
# fuse in their own orders: compared within tests/_tolerance.py's bound for N roundings, ~12
# per step (3- and 4-term dots, the gates) over T steps.
N = 64

# kind -> (our cell, its PyTorch cell's name and options, the PyTorch layer's)
KINDS = {
    "rnn_tanh": (lambda i, h, **k: SimpleRNNCell(i, h, **k), "RNN", {}),
    "rnn_relu": (
        lambda i, h, **k: SimpleRNNCell(i, h, activation=mx.relu, **k),
        "RNN",
        {"nonlinearity": "relu"},
    ),
    "lstm": (lambda i, h, **k: LSTMCell(i, h, **k), "LSTM", {}),
    "gru": (lambda i, h, **k: GRUCell(i, h, **k), "GRU", {}),
}


def _rnn(kind, in_size=IN, reverse=False, **options):
    return RNN(KINDS[kind][0](in_size, H), reverse=reverse, **options)


def _bidirectional(kind, in_size=IN, **options):
    return Bidirectional(_rnn(kind, in_size, **options), _rnn(kind, in_size, True, **options))


def _forward_backward(fn, params, args, cotangents):
    out, vjp = jax.vjp(fn, params, *args)
    return out, vjp(cotangents)


def assert_parity(torch, model, module, args, ours, theirs):
    """``ours(apply, *args)`` and ``theirs(*tensors)`` give the same tuple of arrays (torch
    layouts), and the same gradients of a random linear function of them with respect to
    every argument and every parameter. ``apply(*a, **k)`` is the model's apply_fn output."""
    _, apply_fn = mx.transform(model)
    params = load_state_dict(model, module.state_dict())["params"]
    tensors = [torch.tensor(a, requires_grad=True) for a in args]
    expected = theirs(*tensors)
    rng = np.random.default_rng(0)
    cotangents = tuple(rng.standard_normal(tuple(e.shape)).astype(np.float32) for e in expected)

    def fn(params, *args):
        return ours(lambda *a, **k: apply_fn({"params": params}, None, *a, **k)[0], *args)

    out, (param_grads, *arg_grads) = jax.jit(_forward_backward, static_argnums=0)(
        fn, params, [jnp.asarray(a) for a in args], cotangents
    )
    for a, e in zip(out, expected, strict=True):
        np.testing.assert_allclose(a, e.detach().numpy(), atol=FORWARD_TOL, rtol=FORWARD_TOL)
    sum(
        (e * torch.from_numpy(c)).sum() for e, c in zip(expected, cotangents, strict=True)
    ).backward()
    for grad, tensor in zip(arg_grads, tensors, strict=True):
        np.testing.assert_allclose(grad, tensor.grad.numpy(), atol=GRAD_TOL, rtol=GRAD_TOL)
    torch_grads = {name: p.grad for name, p in module.named_parameters()}
    ours_grads = to_state_dict(model, {"params": param_grads})
    assert sorted(ours_grads) == sorted(torch_grads)
    for name, grad in ours_grads.items():
        np.testing.assert_allclose(
            grad.numpy(), torch_grads[name].numpy(), atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name
        )


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# One step of each cell; two without biases (GRU's b_hn, inside r * (...), is in the RNN test).
@pytest.mark.parametrize(
    "kind, use_bias", [("rnn_tanh", True), ("rnn_relu", False), ("lstm", True), ("gru", False)]
)
def test_cell_matches_torch(torch, kind, use_bias):
    make, name, options = KINDS[kind]
    module = getattr(torch.nn, name + "Cell")(IN, H, bias=use_bias, **options)
    cell = make(IN, H, use_bias=use_bias)
    x, h, c = _randn(B, IN), _randn(B, H, seed=1), _randn(B, H, seed=2)
    if kind == "lstm":
        args = [x, h, c]
        theirs = lambda x, h, c: module(x, (h, c))  # noqa: E731
        ours = lambda apply, x, h, c: (*apply((h, c), x)[0],)  # noqa: E731
    else:
        args = [x, h]
        theirs = lambda x, h: (module(x, h),)  # noqa: E731
        ours = lambda apply, x, h: (apply(h, x)[1],)  # noqa: E731
    assert_parity(torch, cell, module, args, ours, theirs)
    if not use_bias:
        shapes = jax.eval_shape(mx.init(cell), jax.random.key(0))["params"]
        assert sorted(shapes) == ["input_kernel", "recurrent_kernel"]


def _carry_args(kind, directions):
    """Initial carries in PyTorch's layout ``(directions, batch, hidden)``: h (and c)."""
    return [_randn(directions, B, H, seed=1 + i) for i in range(2 if kind == "lstm" else 1)]


def _ours_carry(kind, arrays, direction):
    return (arrays[0][direction], arrays[1][direction]) if kind == "lstm" else arrays[0][direction]


def _torch_carry(kind, tensors):
    return tuple(tensors) if kind == "lstm" else tensors[0]


def _stacked(kind, carry):
    """Our final carry (one direction) as PyTorch's ``h_n`` (and ``c_n``) rows."""
    return list(carry) if kind == "lstm" else [carry]


# Bidirectional covers the forward and the reverse direction; one forward-only layer checks
# the entry names without "_reverse".
@pytest.mark.parametrize(
    "kind, bidirectional", [*((kind, True) for kind in KINDS), ("lstm", False)]
)
def test_rnn_matches_torch(torch, kind, bidirectional):
    _, name, options = KINDS[kind]
    directions = 2 if bidirectional else 1
    module = getattr(torch.nn, name)(
        IN, H, batch_first=True, bidirectional=bidirectional, **options
    )
    model = _bidirectional(kind) if bidirectional else _rnn(kind)
    x, carries = _randn(B, T, IN), _carry_args(kind, directions)

    def theirs(x, *carry):
        y, final = module(x, _torch_carry(kind, carry))
        return (y, *(final if kind == "lstm" else (final,)))

    def ours(apply, x, *carry):
        given = [_ours_carry(kind, carry, d) for d in range(directions)]
        final, y = apply(x, tuple(given) if bidirectional else given[0], return_carry=True)
        finals = final if bidirectional else (final,)
        rows = [_stacked(kind, f) for f in finals]  # per direction: [h] or [h, c]
        return (y, *(jnp.stack(parts) for parts in zip(*rows, strict=True)))

    assert_parity(torch, model, module, [x, *carries], ours, theirs)


def test_stacked_matches_torch_num_layers(torch):
    module = torch.nn.LSTM(IN, H, num_layers=2, batch_first=True, bidirectional=True, dropout=0.5)
    module.eval()
    model = StackedRNN(_bidirectional("lstm"), _bidirectional("lstm", 2 * H), dropout_rate=0.5)

    def ours(apply, x):
        carries, y = apply(x, return_carry=True)  # per layer, per direction: (h, c)
        rows = [direction for layer in carries for direction in layer]
        return y, *(jnp.stack(parts) for parts in zip(*rows, strict=True))

    def theirs(x):
        y, (h, c) = module(x)
        return y, h, c

    assert_parity(torch, model, module, [_randn(B, T, IN)], ours, theirs)


def test_packed_sequences_match_torch(torch):
    module = torch.nn.LSTM(IN, H, batch_first=True, bidirectional=True)
    lengths = np.array([5, 2, 4])
    pack = torch.nn.utils.rnn.pack_padded_sequence
    unpack = torch.nn.utils.rnn.pad_packed_sequence

    def theirs(x):
        packed = pack(x, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False)
        y, (h, c) = module(packed)
        return unpack(y, batch_first=True, total_length=T)[0], h, c

    def ours(apply, x):
        ((hf, cf), (hb, cb)), y = apply(x, seq_lengths=lengths, return_carry=True)
        return y, jnp.stack([hf, hb]), jnp.stack([cf, cb])

    assert_parity(torch, _bidirectional("lstm"), module, [_randn(3, T, IN)], ours, theirs)


def _compiled(model, numpy_init=None, variables=None):
    """``(variables, run)``: ``run(variables, *args, **kwargs)`` is the model's jitted
    output; the variables are NumPy draws when ``numpy_init`` is given."""
    init_fn, apply_fn = mx.transform(model)
    if numpy_init is not None:
        variables = numpy_init(init_fn)
    run = jax.jit(lambda v, *a, **k: apply_fn(v, None, *a, **k)[0], static_argnames="return_carry")
    return variables, run


def test_padded_batch_equals_each_sequence_alone(numpy_init):
    lengths = np.array([5, 2, 0, 2])
    variables, run = _compiled(_bidirectional("gru"), numpy_init)
    x = _randn(len(lengths), T, IN)
    carry, y = run(variables, x, seq_lengths=lengths, return_carry=True)
    _, last = _compiled(_bidirectional("gru", return_sequences=False))
    y_last = last(variables, x, seq_lengths=jnp.asarray(lengths, jnp.int16))
    for i, n in enumerate(lengths):
        carry_i = jax.tree.map(lambda a, i=i: a[i], carry)
        np.testing.assert_array_equal(y[i, n:], 0)
        if n == 0:  # no step: the initial carry, zero outputs
            for a in jax.tree.leaves(carry_i):
                np.testing.assert_array_equal(a, 0)
            np.testing.assert_array_equal(y_last[i], 0)
            continue
        alone_carry, alone = run(variables, x[i, :n], return_carry=True)
        assert_close(y[i, :n], alone, n=N)
        for a, b in zip(jax.tree.leaves(carry_i), jax.tree.leaves(alone_carry), strict=True):
            assert_close(a, b, n=N)
        expected_last = jnp.concatenate([alone[-1, :H], alone[0, H:]])
        assert_close(y_last[i], expected_last, n=N)


def test_rnn_options(numpy_init):
    variables, run = _compiled(_rnn("gru"), numpy_init)
    x = _randn(B, T, IN)
    y = run(variables, x)
    back = run(variables, x[:, ::-1])[:, ::-1]  # reversed: the flipped sequence, flipped back
    cases = [
        ({"return_sequences": False}, x, y[:, -1]),
        ({"reverse": True}, x, back),
        ({"reverse": True, "return_sequences": False}, x, back[:, 0]),
        ({"time_major": True}, x.swapaxes(0, 1), y.swapaxes(0, 1)),
        ({"unroll": 3}, x, y),  # unroll changes the loop, not the numbers
    ]
    for options, given, expected in cases:
        _, run_options = _compiled(_rnn("gru", **options))
        assert_close(run_options(variables, given), expected, n=N, err_msg=str(options))


def test_merge(numpy_init):
    variables, concat = _compiled(_bidirectional("rnn_tanh"), numpy_init)
    x = _randn(B, T, IN)
    both = concat(variables, x)
    forward, backward = both[..., :H], both[..., H:]
    for merge, expected in [("sum", forward + backward), ("mean", (forward + backward) / 2)]:
        model = Bidirectional(_rnn("rnn_tanh"), _rnn("rnn_tanh", reverse=True), merge=merge)
        assert_close(_compiled(model)[1](variables, x), expected, n=N)


def test_any_leading_batch_shape(numpy_init):
    variables, run = _compiled(_rnn("lstm"), numpy_init)
    x = _randn(2, 3, T, IN)
    (h, c), y = run(variables, x, return_carry=True)
    assert y.shape == (2, 3, T, H) and h.shape == c.shape == (2, 3, H)
    flat = run(variables, x.reshape(6, T, IN), return_carry=True)
    for a, b in zip(jax.tree.leaves(((h, c), y)), jax.tree.leaves(flat), strict=True):
        assert_close(a, b.reshape(a.shape), n=N)
    # No batch axis: one sequence (time, features).
    assert_close(run(variables, x[1, 2]), y[1, 2], n=N)


# Past HOISTED_MAX_ROWS rows, the products in a step of the derivative's loop: forward, and
# backward for each argnums of the test below. Per gate, the cell's 4 or 3 gates apart; joined
# (the LSTM from JOINED_MIN_SIZE), one product of each kernel.
_MANY_ROWS_PRODUCTS = {
    ("lstm", "per gate"): (8, [3 * 4, 4 * 4, 2 * 4]),
    ("gru", "per gate"): (6, [3 * 3, 4 * 3, 2 * 3]),
    ("lstm", "joined"): (2, [3, 4, 2]),
}


def _derivative_form(monkeypatch: pytest.MonkeyPatch, form: str) -> int:
    """The rows that make RNN take a derivative ``form`` (hoisted, per gate or joined): the
    joined one set to start at this test's size."""
    rows = B if form == "hoisted" else HOISTED_MAX_ROWS + 1
    if form == "joined":
        monkeypatch.setattr(recurrent, "JOINED_MIN_SIZE", rows * H)
    return rows


@pytest.mark.parametrize("kind, form", sorted(_MANY_ROWS_PRODUCTS))
def test_one_scan_whatever_the_length(kind, form, numpy_init, all_equations, monkeypatch):
    init_fn, apply_fn = mx.transform(_rnn(kind))
    params = numpy_init(init_fn)["params"]
    run = lambda p, x: apply_fn({"params": p}, None, x)[0]  # noqa: E731

    def scans(fn, *args):  # the primitives of each scan body, in order, nested ones included
        return [
            [e.primitive.name for e in eqn.params["jaxpr"].jaxpr.eqns]
            for eqn in all_equations(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name == "scan"
        ]

    short = scans(run, params, jnp.ones((B, 2, IN)))
    assert len(short) == 1
    assert short == scans(run, params, jnp.ones((B, 50, IN)))
    # Forward, each step projects its input and its state inside the loop: two products.
    assert short[0].count("dot_general") == 2

    def loss(p, x):
        return jnp.sum(run(p, x) ** 2)

    def products(fn, *args):  # (in each scan body, outside the scans)
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
        in_scans = [body.count("dot_general") for body in scans(fn, *args)]
        everywhere = [e.primitive.name for e in all_equations(jaxpr)].count("dot_general")
        return in_scans, everywhere - sum(in_scans)

    # Differentiated with few rows per step (B = 2): the kernels' products leave the loops. One
    # product per step forward (the state's projection) and backward (its transpose); outside,
    # the inputs' projection, one product per kernel's gradient, and the input's gradient
    # only where the input is differentiated (no product of a zero tangent).
    # With more rows, backward, the transposes of each product: the two kernels' gradients and
    # the state's, and the input's only where the input is differentiated.
    many = _derivative_form(monkeypatch, form)
    forward, backward = _MANY_ROWS_PRODUCTS[kind, form]
    for argnums, outside, back in zip([0, (0, 1), 1], [2, 3, 1], backward, strict=True):
        grad = jax.grad(loss, argnums)
        assert products(grad, params, jnp.ones((B, 2, IN))) == ([1, 1], 1 + outside)
        assert products(grad, params, jnp.ones((many, 2, IN)))[0] == [forward, back]
        for rows in (B, many):  # and the same loops whatever the length
            short, long = (scans(grad, params, jnp.ones((rows, t, IN))) for t in (2, 50))
            assert short == long


def test_grad_and_vmap(numpy_init):
    variables, run = _compiled(_rnn("gru", reverse=True), numpy_init)
    xs = jnp.asarray(_randn(3, B, T, IN))
    lengths = jnp.array([T, 2])

    def loss(variables, x):
        return jnp.sum(run(variables, x, seq_lengths=lengths) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, xs[0])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # The padding gets no gradient: its steps do not reach the output.
    np.testing.assert_array_equal(grads[1][1, 2:], 0)
    assert float(jnp.abs(grads[1][1, :2]).min()) > 0
    batched = jax.jit(jax.vmap(lambda x: run(variables, x, seq_lengths=lengths)))(xs)
    for x, y in zip(xs, batched, strict=True):
        assert_close(y, run(variables, x, seq_lengths=lengths), n=N)


@pytest.mark.parametrize(
    "kind, form",
    [(kind, form) for kind in ["rnn_tanh", "lstm", "gru"] for form in ["hoisted", "per gate"]]
    + [("lstm", "joined")],
)
def test_derivatives_of_every_mode_are_the_cells(numpy_init, monkeypatch, kind, form):
    # RNN differentiates through a custom JVP (the kernels' products out of the loop with few
    # rows; with more, one product per gate, or the LSTM's gates joined in one): every
    # derivative must be that of the cell stepped by a Python loop. Reversed with padding
    # (lengths T, 2, 0, T, ...), so that the masks cross the custom derivative too.
    rows = _derivative_form(monkeypatch, form)
    model = _rnn(kind, reverse=True)
    init_fn, apply_fn = mx.transform(model)
    params = numpy_init(init_fn)["params"]
    cell_apply = mx.transform(model.cell)[1]
    lengths = jnp.array([T, 2, 0] * rows)[:rows]
    x = jnp.asarray(_randn(rows, T, IN))

    def ours(params, x):
        return apply_fn({"params": params}, None, x, seq_lengths=lengths)[0]

    def loop(params, x):  # each sequence from its last step back to its first, zeros after
        outputs = []
        for b, n in enumerate(lengths.tolist()):
            carry, ys = model.cell.initial_carry(), [jnp.zeros(H)] * T
            for t in reversed(range(n)):
                (carry, ys[t]), _ = cell_apply({"params": params["cell"]}, None, carry, x[b, t])
            outputs.append(jnp.stack(ys))
        return jnp.stack(outputs)

    weights = jnp.asarray(_randn(rows, T, H, seed=1))
    tangents = jax.tree.map(lambda a: jnp.ones_like(a) / a.size, (params, x))

    def loss(fn):
        return lambda params, x: jnp.sum(jnp.tanh(fn(params, x)) * weights)

    derivatives = (
        lambda f: jax.grad(loss(f), argnums=(0, 1)),
        lambda f: jax.grad(loss(f), argnums=1),  # the weights' tangents symbolic zeros
        lambda f: lambda *args: jax.jvp(f, args, tangents)[1],  # forward mode
        lambda f: lambda *args: jax.jvp(jax.grad(loss(f)), args, tangents)[1],  # Hessian-vector
        lambda f: lambda p, x: jax.vmap(jax.grad(loss(f)), (None, 0))(p, jnp.stack([x, -x])),
    )

    def every_derivative(f):  # one jitted program per side: op by op, the loop takes seconds
        return jax.jit(lambda p, x: [derivative(f)(p, x) for derivative in derivatives])

    for a, b in zip(
        jax.tree.leaves(every_derivative(ours)(params, x)),
        jax.tree.leaves(every_derivative(loop)(params, x)),
        strict=True,
    ):
        assert_close(a, b, n=4 * N)  # second derivatives: a few times more roundings


class _SumCell(mx.Module):
    """A custom cell without parameters: the carry is the running sum, the output too."""

    def initial_carry(self, batch_shape):
        return jnp.zeros((*batch_shape, 2))

    def __call__(self, carry, x):
        carry = carry + x
        return carry, carry


def test_custom_cell():
    x = jnp.asarray(_randn(B, T, 2))
    scale = float(jnp.abs(x).sum(1).max())  # running sums of T terms may cancel
    assert_close(_compiled(RNN(_SumCell()))[1]({}, x), jnp.cumsum(x, 1), n=T, scale=scale)
    lengths = jnp.array([3, 5])
    _, run = _compiled(RNN(_SumCell(), reverse=True, return_sequences=False))
    carry, last = run({}, x, seq_lengths=lengths, return_carry=True)
    expected = jnp.stack([x[0, :3].sum(0), x[1].sum(0)])
    assert_close(last, expected, n=T, scale=scale)
    assert_close(carry, expected, n=T, scale=scale)


def test_default_initializers():
    shapes = jax.eval_shape(mx.init(_rnn("lstm")), jax.random.key(0))["params"]["cell"]
    assert {k: v.shape for k, v in shapes.items()} == {
        "input_kernel": (IN, 4 * H),
        "recurrent_kernel": (H, 4 * H),
        "input_bias": (4 * H,),
        "recurrent_bias": (4 * H,),
    }
    params = mx.init(GRUCell(IN, H))(jax.random.key(0))["params"]
    w = params["recurrent_kernel"]
    np.testing.assert_allclose(w @ w.T, np.eye(H), atol=1e-5)  # orthonormal rows, all gates
    np.testing.assert_array_equal(params["input_bias"], 0)
    bound = H**-0.5
    torch_like = mx.initializers.uniform(-bound, bound)
    cell = GRUCell(
        IN, H, input_kernel_init=torch_like, recurrent_kernel_init=torch_like, bias_init=torch_like
    )
    for value in mx.init(cell)(jax.random.key(0))["params"].values():
        assert 0 < float(jnp.abs(value).max()) <= bound


def test_dtypes(numpy_init):
    x = _randn(B, T, IN)
    variables, half = _compiled(RNN(LSTMCell(IN, H, dtype=jnp.bfloat16)), numpy_init)
    (h, c), y = half(variables, x, return_carry=True)
    assert y.dtype == h.dtype == c.dtype == jnp.bfloat16
    # A float32 carry keeps its dtype through a bfloat16 computation.
    carry = LSTMCell(IN, H, dtype=jnp.bfloat16).initial_carry((B,), jnp.float32)
    (h, c), y = half(variables, x, initial_carry=carry, return_carry=True)
    assert h.dtype == c.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    variables16, stored = _compiled(RNN(GRUCell(IN, H, param_dtype=jnp.bfloat16)), numpy_init)
    assert {a.dtype for a in jax.tree.leaves(variables16)} == {jnp.dtype(jnp.bfloat16)}
    assert stored(variables16, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_repr():
    assert SimpleRNNCell(3, 4, activation=mx.relu).extra_repr() == (
        "in_size=3, hidden_size=4, use_bias=True, activation=relu"
    )
    assert LSTMCell(3, 4).extra_repr() == "in_size=3, hidden_size=4, use_bias=True"
    assert RNN(GRUCell(3, 4), unroll=2).extra_repr() == (
        "return_sequences=True, reverse=False, time_major=False, unroll=2"
    )
    text = repr(_bidirectional("lstm"))
    assert "merge='concat'" in text and "reverse=True" in text
    assert StackedRNN(_rnn("gru")).extra_repr() == "dropout_rate=0.0"


def test_user_model_loads_a_bidirectional_torch_lstm(torch):
    class Theirs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(IN, H, bidirectional=True, batch_first=True)

    class Ours(mx.Module):
        def __init__(self):
            self.lstm = _bidirectional("lstm")

    theirs, ours = Theirs(), Ours()
    variables = load_state_dict(ours, theirs.state_dict())
    np.testing.assert_array_equal(
        variables["params"]["lstm"]["backward"]["cell"]["recurrent_kernel"],
        theirs.lstm.weight_hh_l0_reverse.detach().numpy().T,
    )
    back = to_state_dict(ours, variables)
    assert list(back) == list(theirs.state_dict())
    theirs.load_state_dict(back)  # strict: every entry named and shaped as PyTorch's


def test_state_dict_of_another_architecture(torch):
    module = torch.nn.LSTM(IN, H, num_layers=2, batch_first=True)
    with pytest.raises(mx.errors.VariablesStructureError, match="weight_ih_l1"):
        load_state_dict(_rnn("lstm"), module.state_dict())
    gru = torch.nn.GRU(IN, H, batch_first=True)
    with pytest.raises(mx.errors.VariableShapeError, match="weight_ih_l0"):
        load_state_dict(_rnn("lstm"), gru.state_dict())


class _Net(mx.Module):
    def __init__(self, layer):
        self.rnn = layer

    def __call__(self, *args, **kwargs):
        return self.rnn(*args, **kwargs)


def _raises(layer, error, *args, **kwargs):
    init_fn, apply_fn = mx.transform(_Net(layer))
    variables = jax.eval_shape(init_fn, jax.random.key(0))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    with pytest.raises(error) as info:
        apply_fn(variables, None, *args, **kwargs)
    return str(info.value)


def test_cell_errors():
    cell = LSTMCell(IN, H)
    x, h = jnp.ones((B, IN)), jnp.ones((B, H))
    message = _raises(cell, mx.errors.InputShapeError, (h, h), jnp.ones((B, IN + 1)))
    assert "LSTMCell at 'rnn'" in message and "in_size=3" in message and "(2, 4)" in message
    assert "build the cell with in_size" in message
    message = _raises(cell, mx.errors.InputShapeError, [h, h], x)
    assert (
        "(h, c)" in message and "[(2, 4), (2, 4)]" in message and "initial_carry((2,))" in message
    )
    message = _raises(cell, mx.errors.InputShapeError, (h, jnp.ones((3, H))), x)
    assert "(2, 4)" in message and "(3, 4)" in message
    message = _raises(GRUCell(IN, H), mx.errors.InputShapeError, jnp.ones((B, H + 1)), x)
    assert "GRUCell at 'rnn'" in message and "hidden_size=4" in message
    message = _raises(GRUCell(IN, H), mx.errors.InputShapeError, h, jnp.ones(()))
    assert "shape ()" in message


def test_rnn_errors():
    rnn = _rnn("gru")
    for shape in [(IN,), (B, 0, IN)]:
        message = _raises(rnn, mx.errors.InputShapeError, jnp.ones(shape))
        assert "RNN at 'rnn'" in message and "(*batch, time, features)" in message
    message = _raises(_rnn("gru", time_major=True), mx.errors.InputShapeError, jnp.ones((0, B, IN)))
    assert "(time, *batch, features)" in message
    message = _raises(rnn, mx.errors.InputShapeError, jnp.ones((B, T, IN + 1)))
    assert "GRUCell at 'rnn/cell'" in message and "(*batch, time, features)" in message
    message = _raises(rnn, mx.errors.InputShapeError, jnp.ones((B, T, IN)), jnp.ones((3, H)))
    assert "(2, 4)" in message and "(3, 4)" in message
    x = jnp.ones((B, T, IN))
    message = _raises(rnn, mx.errors.InputDtypeError, x, seq_lengths=jnp.ones(B))
    assert "integer seq_lengths" in message and "float32" in message
    message = _raises(rnn, mx.errors.InputShapeError, x, seq_lengths=jnp.ones(3, jnp.int32))
    assert "seq_lengths of shape (2,)" in message and "(3,)" in message
    message = _raises(_bidirectional("gru"), mx.errors.InputShapeError, x, jnp.ones((B, H)))
    assert "Bidirectional at 'rnn'" in message and "(forward_carry, backward_carry)" in message
    stack = StackedRNN(_rnn("gru"), _rnn("gru", H))
    message = _raises(stack, mx.errors.InputShapeError, x, [None])
    assert "StackedRNN at 'rnn'" in message and "2 carries" in message


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: SimpleRNNCell(0, 4), "`in_size` must be a positive int"),
        (lambda: LSTMCell(3, 2.5), "`hidden_size` must be a positive int"),
        (lambda: SimpleRNNCell(3, 4, "tanh"), "`activation` must be a function"),
        (lambda: RNN(jnp.tanh), "`cell` must be a cell module"),
        (lambda: RNN(mx.Dense(3, 4)), "got Dense"),
        (lambda: RNN(GRUCell(3, 4), unroll=0), "`unroll` must be a positive int"),
        (
            lambda: Bidirectional(_rnn("gru"), _rnn("gru")),
            "`backward` must be an RNN with reverse=True",
        ),
        (lambda: Bidirectional(_rnn("gru", reverse=True), _rnn("gru", reverse=True)), "`forward`"),
        (lambda: Bidirectional(GRUCell(3, 4), _rnn("gru", reverse=True)), "got a GRUCell"),
        (
            lambda: Bidirectional(_rnn("gru"), _rnn("gru", reverse=True, return_sequences=False)),
            "return_sequences",
        ),
        (
            lambda: Bidirectional(_rnn("gru"), _rnn("gru", reverse=True, time_major=True)),
            "time_major",
        ),
        (lambda: Bidirectional(_rnn("gru"), _rnn("gru", reverse=True), merge="max"), "'concat'"),
        (lambda: Bidirectional(_rnn("gru"), _rnn("gru", reverse=True), merge=["sum"]), "['sum']"),
        (lambda: StackedRNN(), "at least one layer"),
        (lambda: StackedRNN([_rnn("gru")]), "layer 0 is a list"),
        (lambda: StackedRNN(_rnn("gru", return_sequences=False), _rnn("gru", H)), "layer 0 has"),
        (lambda: StackedRNN(_rnn("gru"), dropout_rate=1.5), "dropout_rate"),
    ],
)
def test_config_errors(make, fragment):
    with pytest.raises(mx.errors.LayerConfigError, match=re.escape(fragment)):
        make()


@pytest.mark.parametrize("cell", [SimpleRNNCell, LSTMCell, GRUCell])
def test_cells_show_their_arguments(cell):
    # LSTMCell and GRUCell inherit the shared constructor: its signature and documented
    # arguments are theirs, keyword by keyword.
    parameters = inspect.signature(cell).parameters
    shared = ["in_size", "hidden_size", "use_bias", "input_kernel_init", "recurrent_kernel_init"]
    assert [name for name in parameters if name != "activation"][:5] == shared
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters.values())
    doc = inspect.getdoc(cell)
    assert "{" not in doc.split("Example:")[0]
    for name in parameters:
        assert f"\n    {name}: " in doc
