"""Each metoryx layer against the same layer of Flax Linen, Flax NNX and Equinox.

Run from the repository root::

    python benchmarks/bench_peers.py               # the recorded numbers
    python benchmarks/bench_peers.py --quick       # a smoke run: fewer, shorter repeats
    python benchmarks/bench_peers.py --only lstm   # the layers whose name contains "lstm"

The peers are optional (``pip install --constraint <(printf 'jax==0.10.2\\njaxlib==0.10.2\\n')
-e '.[bench]'``, as for ``bench_deep.py``); a peer that is not installed has no column, and with
none the script still times metoryx against hand-written JAX.

Per layer, two jitted programs per side: the forward pass, and the forward and backward pass
(``jax.value_and_grad`` of ``mean(y ** 2)`` with respect to the parameters and the floating
inputs). Every side is a pure function of arrays under plain ``jax.jit``: metoryx's
``apply_fn``, Linen's ``Module.apply``, NNX's ``nnx.merge`` of the ``nnx.split`` state, and
Equinox's ``eqx.combine`` of the ``eqx.partition`` arrays (``jax.vmap`` over the batch, as
Equinox layers take one example). So the table compares the compiled programs, not the Python
of a call. The hand-written column is the same math in plain ``jnp``/``lax`` over metoryx's
parameter dict; a second ``jax.jit`` of it is the noise floor.

All sides start from the same weights: metoryx's ``init_fn`` output, every parameter moved off
its initial value by noise (so that a bias or a scale mapped wrongly shows), converted to each
peer's layout. The script checks that each side's forward output (and the loss of the backward
pass) agrees with metoryx's within float32 tolerance where the semantics match, and says in a
note where they cannot (dropout draws its own random numbers in each library).

Semantics are matched where the peer allows it: epsilon and momentum set alike; Flax's norms
with ``use_fast_variance=False`` (the two-pass variance that metoryx, Equinox and PyTorch
compute; Flax's default ``E[x^2] - E[x]^2`` is a different, less accurate formula);
``broadcast_dropout=False`` in Flax's attention (one mask per example, as metoryx); Flax's
``OptimizedLSTMCell`` (its fast LSTM; the same parameters as ``LSTMCell``); Equinox's
``BatchNorm(mode="batch")`` (normalizes with the batch statistics in training). Equinox's
convolutions and channel norms are channels-first: they get the input transposed to NCHW
outside the timed function, as an Equinox user's data would be. Where a peer has no such layer
(grouped-query attention in Linen and Equinox) the cell is "—". The recurrent layers run at
two batch sizes, 8 sequences of 64 steps and 32 of 128 (``, 32 rows``): ``RNN`` picks its
derivative by the rows of a step, and each must hold its own against the peers.

As in the other benchmarks, the sides' repeats are interleaved (A B C, B C A, ...) and the
table gives the median time of the hand-written side (µs per call) and, for every other side,
the median of per-repeat ratios to it ("paired"). The verdict compares metoryx with the fastest
peer of the same semantics directly (the median of per-repeat ratios metoryx / that peer; a
peer that computes something else, noted under the table, is shown but not compared): metoryx
must not be slower by more than the noise floor (``|hand again / hand - 1|``, at least 3%).
A row found slower is measured a second time, every side compiled anew, and is slower only if
the second measurement finds it so too: over 32 rows, a floor that wide flags about one row a
run by chance (a peer's program landing fast for a whole measurement has been seen), where a
real gap shows in both. The exit status is 1 if a row is slower, and the last line names the
layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _hand import (  # noqa: E402
    EPSILON,
    MOMENTUM,
    gru_step,
    hand_batch_norm,
    hand_dense,
    hand_layer_norm,
    hand_rms_norm,
    standardize,
)
from _timing import (  # noqa: E402
    call_sampler,
    header,
    interleaved,
    markdown,
    one_call,
    optimized_program,
    paired,
)

import metoryx as mx  # noqa: E402

try:
    import flax
    import flax.linen as nn
    from flax import nnx
except ImportError:
    flax = nn = nnx = None  # type: ignore[assignment]
try:
    import equinox as eqx
except ImportError:
    eqx = None  # type: ignore[assignment]

PASSES = ("forward", "forward+backward")
PEERS = ("Linen", "NNX", "Equinox")
MIN_MARGIN = 0.03  # the smallest noise margin of the verdict
DROPOUT_RATE = 0.1
BATCH, SEQ, WIDTH, HEADS = 8, 128, 256, 8
HEAD_DIM = WIDTH // HEADS
KV_HEADS = 2
RNN_SEQ, RNN_IN, HIDDEN = 64, 64, 128
IMAGE, CHANNELS = 32, 32
GROUPS = 8
VOCAB = 1024

# (params, state, *inputs) -> (output, new state); ``state`` holds what is not trained.
Fn = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass
class Side:
    """One library's version of a layer: its function, its own arguments, and how its output
    maps to metoryx's layout for the check (None where the semantics differ)."""

    fn: Fn
    args: tuple[Any, ...]
    to_ours: Callable[[Any], Any] | None = lambda y: y
    note: str = ""
    # False where the peer computes something else (another formula, another out-of-range
    # rule): shown, but not the layer the verdict compares metoryx with.
    same_semantics: bool = True


@dataclasses.dataclass
class Case:
    name: str
    shape: str
    sides: dict[str, Side]  # "hand", "mx", then the peers present


def stateless(fn: Callable[..., Any]) -> Fn:
    """``fn(params, *inputs) -> y`` as an ``Fn`` with no state."""

    def run(params: Any, state: Any, *inputs: Any) -> tuple[Any, Any]:
        return fn(params, *inputs), {}

    return run


def perturbed(params: Any, key: jax.Array) -> Any:
    """``params`` each moved by ``N(0, 0.1^2)`` noise: a bias or scale still at its initial
    zeros or ones would hide a wrong mapping to a peer's layout."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def metoryx_side(
    model: mx.Module,
    hand: Fn,
    inputs: tuple[Any, ...],
    call: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Side], Any]:
    """The metoryx and hand-written sides over metoryx's (perturbed) variables, and the
    parameter dict the peers are built from. metoryx's side is ``apply_fn(variables, None,
    *inputs, **kwargs)``, or ``call(apply_fn, variables, *inputs)``."""
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    params = perturbed(variables.get("params", {}), jax.random.key(1))
    state = {c: v for c, v in variables.items() if c != "params"}
    if call is None:
        call = lambda apply, variables, *inputs: apply(variables, None, *inputs, **kwargs)  # noqa: E731

    def ours(params: Any, state: Any, *inputs: Any) -> tuple[Any, Any]:
        y, new = call(apply_fn, {"params": params, **state}, *inputs)
        return y, {c: new[c] for c in state}

    args = (params, state, *inputs)
    return {"hand": Side(hand, args), "mx": Side(ours, args)}, params


def to_nchw(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 1)


def to_nhwc(y: jax.Array) -> jax.Array:
    return jnp.moveaxis(y, 1, -1)


def batched(fn: Callable[..., Any], depth: int) -> Callable[..., Any]:
    """``fn`` of one example vmapped over ``depth`` leading axes (Equinox's layers)."""
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


# ---------------------------------------------------------------------------------------------
# Building the peers from metoryx's parameters.


def linen_side(module: Any, variables: dict[str, Any], *inputs: Any, **kwargs: Any) -> Side:
    """A Linen module applied to ``variables`` (``"params"`` trained, the rest passed as state
    and returned updated when ``mutable``). With ``rng_input`` the last input is the key of
    the ``"dropout"`` stream; with ``mask_input`` the one before it (or the last) is passed
    as ``mask=``."""
    mutable = kwargs.pop("mutable", False)
    rng_input = kwargs.pop("rng_input", False)
    mask_input = kwargs.pop("mask_input", False)
    params = variables["params"]
    state = {c: v for c, v in variables.items() if c != "params"}

    def fn(params: Any, state: Any, *inputs: Any) -> tuple[Any, Any]:
        rngs = {"dropout": inputs[-1]} if rng_input else None
        xs = inputs[: len(inputs) - rng_input]
        keywords = dict(kwargs)
        if mask_input:
            *xs, keywords["mask"] = xs
        variables = {"params": params, **state}
        out = module.apply(variables, *xs, rngs=rngs, mutable=mutable, **keywords)
        return out if mutable else (out, {})

    return Side(fn, (params, state, *inputs))


def nnx_side(model: Any, call: Callable[..., Any], *inputs: Any, state_type: Any = None) -> Side:
    """An NNX module as a pure function: ``nnx.split`` into the parameters (trained) and the
    rest, ``nnx.merge`` inside, ``call(model, *inputs)``; with ``state_type`` the new state of
    that type is returned."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(params: Any, rest: Any, *inputs: Any) -> tuple[Any, Any]:
        model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables in this trace
        y = call(model, *inputs)
        return y, (nnx.state(model, state_type) if state_type is not None else {})

    return Side(fn, (params, rest, *inputs))


def eqx_side(model: Any, call: Callable[..., Any], *inputs: Any, state: Any = None) -> Side:
    """An Equinox module as a pure function of its arrays: ``call(model, state, *inputs)``
    returns ``(y, new state)``."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(params: Any, state: Any, *inputs: Any) -> tuple[Any, Any]:
        return call(eqx.combine(params, static), state, *inputs)

    return Side(fn, (params, {} if state is None else state, *inputs))


def eqx_set(model: Any, **values: Any) -> Any:
    """``model`` with the named fields (``"query_proj.weight"``, ...) replaced."""
    for path, value in values.items():
        names = path.split(".")

        def where(m: Any, names: list[str] = names) -> Any:
            for name in names:
                m = getattr(m, name)
            return m

        model = eqx.tree_at(where, model, value)
    return model


def nnx_set(model: Any, **values: Any) -> Any:
    """``model`` with the named parameters (``"dense_i.kernel"``, ...) set in place."""
    for path, value in values.items():
        *parents, name = path.split(".")
        owner = model
        for parent in parents:
            owner = getattr(owner, parent)
        getattr(owner, name)[...] = value
    return model


def rngs() -> Any:
    return nnx.Rngs(0)


# ---------------------------------------------------------------------------------------------
# The layers: hand-written side, metoryx side and peers.


def dense_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, SEQ, WIDTH))
    sides, p = metoryx_side(mx.Dense(WIDTH, WIDTH), stateless(hand_dense), (x,))
    k, b = p["kernel"], p["bias"]
    if nn is not None:
        sides["Linen"] = linen_side(nn.Dense(WIDTH), {"params": {"kernel": k, "bias": b}}, x)
        layer = nnx_set(nnx.Linear(WIDTH, WIDTH, rngs=rngs()), kernel=k, bias=b)
        sides["NNX"] = nnx_side(layer, lambda m, x: m(x), x)
    if eqx is not None:
        linear = eqx_set(eqx.nn.Linear(WIDTH, WIDTH, key=key), weight=k.T, bias=b)
        sides["Equinox"] = eqx_side(linear, lambda m, s, x: (batched(m, 2)(x), s), x)
    return Case(f"Dense {WIDTH}→{WIDTH}", "8 x 128 x 256", sides)


def hand_conv(p: Any, x: jax.Array) -> jax.Array:
    y = lax.conv_general_dilated(
        x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]


def conv_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, IMAGE, IMAGE, CHANNELS))
    sides, p = metoryx_side(mx.Conv(CHANNELS, CHANNELS, (3, 3)), stateless(hand_conv), (x,))
    k, b = p["kernel"], p["bias"]
    if nn is not None:
        conv = nn.Conv(CHANNELS, (3, 3), padding="SAME")
        sides["Linen"] = linen_side(conv, {"params": {"kernel": k, "bias": b}}, x)
        layer = nnx.Conv(CHANNELS, CHANNELS, (3, 3), padding="SAME", rngs=rngs())
        sides["NNX"] = nnx_side(nnx_set(layer, kernel=k, bias=b), lambda m, x: m(x), x)
    if eqx is not None:
        conv = eqx.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, key=key)
        conv = eqx_set(conv, weight=jnp.transpose(k, (3, 2, 0, 1)), bias=b[:, None, None])
        side = eqx_side(conv, lambda m, s, x: (batched(m, 1)(x), s), to_nchw(x))
        side.to_ours = to_nhwc
        sides["Equinox"] = side
    return Case("Conv 3x3 32→32", "8 x 32 x 32 x 32", sides)


def hand_conv_transpose(p: Any, x: jax.Array) -> jax.Array:
    # PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1): the stored kernel is flipped
    # here; (kernel - 1 - padding) zeros on each side of the dilated input.
    kernel = lax.rev(p["kernel"], (0, 1))
    nhwc = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=nhwc)
    return y + p["bias"]


def conv_transpose_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, 16, 16, CHANNELS))
    model = mx.ConvTranspose(CHANNELS, 16, (4, 4), strides=2, padding=1)
    sides, p = metoryx_side(model, stateless(hand_conv_transpose), (x,))
    k, b = p["kernel"], p["bias"]
    flipped = k[::-1, ::-1]  # Flax does not flip its kernel (transpose_kernel=False)
    if nn is not None:
        conv = nn.ConvTranspose(16, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))
        sides["Linen"] = linen_side(conv, {"params": {"kernel": flipped, "bias": b}}, x)
        layer = nnx.ConvTranspose(
            CHANNELS, 16, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), rngs=rngs()
        )
        sides["NNX"] = nnx_side(nnx_set(layer, kernel=flipped, bias=b), lambda m, x: m(x), x)
    if eqx is not None:
        conv = eqx.nn.ConvTranspose2d(CHANNELS, 16, 4, stride=2, padding=1, key=key)
        # (out, in, kh, kw), flipped: Equinox applies its weight as the kernel of the
        # convolution over the dilated input, as Flax does
        weight = jnp.transpose(flipped, (3, 2, 0, 1))
        conv = eqx_set(conv, weight=weight, bias=b[:, None, None])
        side = eqx_side(conv, lambda m, s, x: (batched(m, 1)(x), s), to_nchw(x))
        side.to_ours = to_nhwc
        sides["Equinox"] = side
    return Case("ConvTranspose 4x4 s2 32→16", "8 x 16 x 16 x 32", sides)


def layer_norm_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, SEQ, WIDTH)) + 1.0
    sides, p = metoryx_side(mx.LayerNorm(WIDTH), stateless(hand_layer_norm), (x,))
    s, b = p["scale"], p["bias"]
    if nn is not None:
        norm = nn.LayerNorm(epsilon=EPSILON, use_fast_variance=False)
        sides["Linen"] = linen_side(norm, {"params": {"scale": s, "bias": b}}, x)
        layer = nnx.LayerNorm(WIDTH, epsilon=EPSILON, use_fast_variance=False, rngs=rngs())
        sides["NNX"] = nnx_side(nnx_set(layer, scale=s, bias=b), lambda m, x: m(x), x)
    if eqx is not None:
        norm = eqx_set(eqx.nn.LayerNorm(WIDTH, eps=EPSILON), weight=s, bias=b)
        sides["Equinox"] = eqx_side(norm, lambda m, st, x: (batched(m, 2)(x), st), x)
    return Case(f"LayerNorm {WIDTH}", "8 x 128 x 256", sides)


def rms_norm_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, SEQ, WIDTH))
    sides, p = metoryx_side(mx.RMSNorm(WIDTH), stateless(hand_rms_norm), (x,))
    s = p["scale"]
    if nn is not None:
        sides["Linen"] = linen_side(nn.RMSNorm(epsilon=1e-6), {"params": {"scale": s}}, x)
        layer = nnx_set(nnx.RMSNorm(WIDTH, epsilon=1e-6, rngs=rngs()), scale=s)
        sides["NNX"] = nnx_side(layer, lambda m, x: m(x), x)
    if eqx is not None:
        norm = eqx_set(eqx.nn.RMSNorm(WIDTH, eps=1e-6, use_bias=False), weight=s)
        sides["Equinox"] = eqx_side(norm, lambda m, st, x: (batched(m, 2)(x), st), x)
    return Case(f"RMSNorm {WIDTH}", "8 x 128 x 256", sides)


def batch_norm_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, IMAGE, IMAGE, CHANNELS)) + 1.0
    model = mx.BatchNorm(CHANNELS, momentum=MOMENTUM, epsilon=EPSILON)
    sides, p = metoryx_side(model, hand_batch_norm, (x,), is_training=True)
    s, b = p["scale"], p["bias"]
    stats = {"mean": jnp.zeros(CHANNELS), "var": jnp.ones(CHANNELS)}
    if nn is not None:
        norm = nn.BatchNorm(
            use_running_average=False,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            use_fast_variance=False,
        )
        variables = {"params": {"scale": s, "bias": b}, "batch_stats": stats}
        sides["Linen"] = linen_side(norm, variables, x, mutable=["batch_stats"])
        layer = nnx.BatchNorm(
            CHANNELS,
            use_running_average=False,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            use_fast_variance=False,
            rngs=rngs(),
        )
        layer = nnx_set(layer, scale=s, bias=b)
        sides["NNX"] = nnx_side(layer, lambda m, x: m(x), x, state_type=nnx.BatchStat)
    if eqx is not None:
        norm, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            CHANNELS, "batch", eps=EPSILON, momentum=MOMENTUM, mode="batch"
        )
        norm = eqx_set(norm, weight=s, bias=b)

        def call(m: Any, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            return jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

        side = eqx_side(norm, call, to_nchw(x), state=state)
        side.to_ours = to_nhwc
        sides["Equinox"] = side
    return Case("BatchNorm train", "8 x 32 x 32 x 32", sides)


def hand_group_norm(p: Any, x: jax.Array) -> jax.Array:
    grouped = x.reshape(*x.shape[:-1], GROUPS, x.shape[-1] // GROUPS)
    y = standardize(grouped, (*range(1, x.ndim - 1), x.ndim)).reshape(x.shape)
    return y * p["scale"] + p["bias"]


def group_norm_case(key: jax.Array) -> Case:
    x = jax.random.normal(key, (BATCH, IMAGE, IMAGE, CHANNELS)) + 1.0
    sides, p = metoryx_side(mx.GroupNorm(GROUPS, CHANNELS), stateless(hand_group_norm), (x,))
    s, b = p["scale"], p["bias"]
    if nn is not None:
        norm = nn.GroupNorm(num_groups=GROUPS, epsilon=EPSILON, use_fast_variance=False)
        sides["Linen"] = linen_side(norm, {"params": {"scale": s, "bias": b}}, x)
        layer = nnx.GroupNorm(
            CHANNELS, num_groups=GROUPS, epsilon=EPSILON, use_fast_variance=False, rngs=rngs()
        )
        sides["NNX"] = nnx_side(nnx_set(layer, scale=s, bias=b), lambda m, x: m(x), x)
    if eqx is not None:
        norm = eqx_set(
            eqx.nn.GroupNorm(GROUPS, CHANNELS, eps=EPSILON),
            weight=s[:, None, None],
            bias=b[:, None, None],
        )
        side = eqx_side(norm, lambda m, st, x: (batched(m, 1)(x), st), to_nchw(x))
        side.to_ours = to_nhwc
        sides["Equinox"] = side
    return Case(f"GroupNorm {GROUPS} groups", "8 x 32 x 32 x 32", sides)


def embed_case(key: jax.Array) -> Case:
    ids = jax.random.randint(key, (BATCH, SEQ), 0, VOCAB, jnp.int32)
    hand = stateless(lambda p, ids: jnp.take(p["embedding"], ids, axis=0))
    sides, p = metoryx_side(mx.Embed(VOCAB, WIDTH), hand, (ids,))
    table = p["embedding"]
    if nn is not None:
        embed = nn.Embed(VOCAB, WIDTH)
        sides["Linen"] = linen_side(embed, {"params": {"embedding": table}}, ids)
        layer = nnx_set(nnx.Embed(VOCAB, WIDTH, rngs=rngs()), embedding=table)
        sides["NNX"] = nnx_side(layer, lambda m, ids: m(ids), ids)
    if eqx is not None:
        embedding = eqx.nn.Embedding(weight=table)
        side = eqx_side(embedding, lambda m, s, ids: (batched(m, 2)(ids), s), ids)
        side.note = "indexes (`weight[id]`), which clamps an id out of range (metoryx: NaN row)"
        side.same_semantics = False
        sides["Equinox"] = side
    return Case(f"Embed {VOCAB}x{WIDTH}", "8 x 128 ids", sides)


# Recurrent layers --------------------------------------------------------------------------


def hand_rnn(step: Callable[..., Any], carry: Callable[[jax.Array], Any]) -> Fn:
    """A ``lax.scan`` over time of ``step(cell params, carry, projected input)``, the input
    projection of all steps done at once before the scan."""

    def rnn(p: Any, x: jax.Array) -> jax.Array:
        cell = p["cell"]
        projected = jnp.swapaxes(x, 0, 1) @ cell["input_kernel"] + cell["input_bias"]
        init = carry(jnp.zeros((x.shape[0], HIDDEN), x.dtype))
        _, hs = lax.scan(partial(step, cell), init, projected)
        return jnp.swapaxes(hs, 0, 1)

    return stateless(rnn)


def lstm_step(cell: Any, carry: tuple[jax.Array, jax.Array], xp: jax.Array) -> tuple:
    h, c = carry
    gates = xp + h @ cell["recurrent_kernel"] + cell["recurrent_bias"]
    i, f, g, o = jnp.split(gates, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def eqx_rnn(cell: Any, carry: Callable[[], Any], out: Callable[[Any], jax.Array]) -> Callable:
    """Equinox's way: a ``lax.scan`` of the one-example cell over time, vmapped over the
    batch."""

    def sequence(xs: jax.Array) -> jax.Array:
        def step(c: Any, x: jax.Array) -> tuple[Any, jax.Array]:
            new = cell(x, c)
            return new, out(new)

        return lax.scan(step, carry(), xs)[1]

    return jax.vmap(sequence)


def rnn_name(cell: str, batch: int, steps: int) -> str:
    """A recurrent case's name: the shape of this table's first RNN rows (8 rows, where
    ``RNN`` takes the kernels' gradients out of the loop) named bare, any other with its
    rows."""
    rows = "" if (batch, steps) == (BATCH, RNN_SEQ) else f", {batch} rows"
    return f"{cell} {RNN_IN}→{HIDDEN}, scanned{rows}"


def lstm_case(key: jax.Array, batch: int = BATCH, steps: int = RNN_SEQ) -> Case:
    x = jax.random.normal(key, (batch, steps, RNN_IN))
    model = mx.RNN(mx.LSTMCell(RNN_IN, HIDDEN))
    sides, p = metoryx_side(model, hand_rnn(lstm_step, lambda z: (z, z)), (x,))
    c = p["cell"]
    wi, wh, bias = c["input_kernel"], c["recurrent_kernel"], c["input_bias"] + c["recurrent_bias"]
    zeros = jnp.zeros((batch, HIDDEN))
    if nn is not None:
        gates = {}
        for n, (gi, gh, gb) in enumerate(
            zip(*(jnp.split(a, 4, -1) for a in (wi, wh, bias)), strict=True)
        ):
            gates[f"i{'ifgo'[n]}"] = {"kernel": gi}
            gates[f"h{'ifgo'[n]}"] = {"kernel": gh, "bias": gb}
        rnn = nn.RNN(nn.OptimizedLSTMCell(HIDDEN))
        sides["Linen"] = linen_side(rnn, {"params": {"cell": gates}}, x)
        cell = nnx.OptimizedLSTMCell(RNN_IN, HIDDEN, rngs=rngs())
        cell = nnx_set(cell, **{"dense_i.kernel": wi, "dense_h.kernel": wh, "dense_h.bias": bias})
        layer = nnx.RNN(cell)
        sides["NNX"] = nnx_side(layer, lambda m, x: m(x, initial_carry=(zeros, zeros)), x)
    if eqx is not None:
        cell = eqx_set(
            eqx.nn.LSTMCell(RNN_IN, HIDDEN, key=key), weight_ih=wi.T, weight_hh=wh.T, bias=bias
        )

        def call(m: Any, s: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            z = jnp.zeros(HIDDEN)
            return eqx_rnn(m, lambda: (z, z), lambda hc: hc[0])(x), s

        sides["Equinox"] = eqx_side(cell, call, x)
    return Case(rnn_name("LSTM", batch, steps), f"{batch} x {steps} x {RNN_IN}", sides)


def gru_case(key: jax.Array, batch: int = BATCH, steps: int = RNN_SEQ) -> Case:
    x = jax.random.normal(key, (batch, steps, RNN_IN))
    model = mx.RNN(mx.GRUCell(RNN_IN, HIDDEN))
    sides, p = metoryx_side(model, hand_rnn(gru_step, lambda z: z), (x,))
    c = p["cell"]
    wi, wh, bi, bh = c["input_kernel"], c["recurrent_kernel"], c["input_bias"], c["recurrent_bias"]
    if nn is not None:
        (ir, iz, in_), (hr, hz, hn) = jnp.split(wi, 3, -1), jnp.split(wh, 3, -1)
        (bir, biz, bin_), (bhr, bhz, bhn) = jnp.split(bi, 3), jnp.split(bh, 3)
        gates = {
            "ir": {"kernel": ir, "bias": bir + bhr},
            "iz": {"kernel": iz, "bias": biz + bhz},
            "in": {"kernel": in_, "bias": bin_},
            "hr": {"kernel": hr},
            "hz": {"kernel": hz},
            "hn": {"kernel": hn, "bias": bhn},
        }
        sides["Linen"] = linen_side(nn.RNN(nn.GRUCell(HIDDEN)), {"params": {"cell": gates}}, x)
        # NNX's GRUCell has no bias inside the reset gate's product (PyTorch's b_hn): its
        # recurrent projection has none, so only the sum b_ih + b_hh of r and z fits.
        cell = nnx.GRUCell(RNN_IN, HIDDEN, rngs=rngs())
        folded = bi + jnp.concatenate([bhr, bhz, jnp.zeros_like(bhn)])
        cell = nnx_set(cell, **{"dense_i.kernel": wi, "dense_h.kernel": wh, "dense_i.bias": folded})
        zeros = jnp.zeros((batch, HIDDEN))
        side = nnx_side(nnx.RNN(cell), lambda m, x: m(x, initial_carry=zeros), x)
        side.to_ours = None
        side.note = "its GRUCell has no b_hn inside the reset product (PyTorch's, metoryx's)"
        side.same_semantics = False
        sides["NNX"] = side
    if eqx is not None:
        bias = bi + jnp.concatenate([bh[: 2 * HIDDEN], jnp.zeros(HIDDEN)])
        cell = eqx_set(
            eqx.nn.GRUCell(RNN_IN, HIDDEN, key=key),
            weight_ih=wi.T,
            weight_hh=wh.T,
            bias=bias,
            bias_n=bh[2 * HIDDEN :],
        )

        def call(m: Any, s: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            return eqx_rnn(m, lambda: jnp.zeros(HIDDEN), lambda h: h)(x), s

        sides["Equinox"] = eqx_side(cell, call, x)
    return Case(rnn_name("GRU", batch, steps), f"{batch} x {steps} x {RNN_IN}", sides)


# Attention ---------------------------------------------------------------------------------


def hand_attention(kv_heads: int, rate: float = 0.0) -> Fn:
    """Einsum attention over metoryx's projections: ``mask`` (boolean, broadcast to
    ``(batch, heads, T, S)``) is the last input, or the key of the dropout before it."""

    def attention(p: Any, state: Any, x: jax.Array, mask: jax.Array, *key: jax.Array) -> tuple:
        b, t, _ = x.shape
        group = HEADS // kv_heads
        q = hand_dense(p["query"], x).reshape(b, t, kv_heads, group, HEAD_DIM)
        k = hand_dense(p["key"], x).reshape(b, t, kv_heads, HEAD_DIM)
        v = hand_dense(p["value"], x).reshape(b, t, kv_heads, HEAD_DIM)
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(HEAD_DIM)
        masked = mask.reshape(b, 1, 1, t, t) if mask.ndim == 4 else mask
        logits = jnp.where(masked, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        if rate:
            keep = jax.random.bernoulli(key[0], 1 - rate, weights.shape)
            weights = jnp.where(keep, weights / (1 - rate), 0.0)
        attended = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, WIDTH)
        return hand_dense(p["out"], attended), {}

    return attention


def attention_case(key: jax.Array, variant: str) -> Case:
    """``variant``: "causal" (metoryx's is_causal; the peers and the hand-written side take
    the causal mask), "masked" (a boolean padding-and-causal mask as an input), "GQA" (2 kv
    heads, causal) or "dropout" (causal, dropout 0.1 on the weights in training)."""
    kx, kmask = jax.random.split(key)
    x = jax.random.normal(kx, (BATCH, SEQ, WIDTH))
    causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
    lengths = jax.random.randint(kmask, (BATCH,), SEQ // 2, SEQ + 1)
    padding = jnp.arange(SEQ) < lengths[:, None]
    mask = (causal & padding[:, None, :])[:, None] if variant == "masked" else causal[None, None]
    mask = jnp.broadcast_to(mask, (BATCH, 1, SEQ, SEQ))
    kv_heads = KV_HEADS if variant == "GQA" else HEADS
    rate = DROPOUT_RATE if variant == "dropout" else 0.0
    model = mx.MultiHeadAttention(HEADS, WIDTH, num_kv_heads=kv_heads, dropout_rate=rate)
    inputs: tuple[Any, ...] = (x, mask) + ((jax.random.key(3),) if rate else ())

    def call(apply: Any, variables: Any, x: jax.Array, mask: jax.Array, *key: Any) -> Any:
        rngs = mx.PRNGKeys(dropout=key[0]) if key else None
        if variant == "masked":
            return apply(variables, rngs, x, mask=mask)
        # the mask input is the causal mask, which metoryx builds itself
        return apply(variables, rngs, x, is_causal=True, is_training=bool(rate))

    sides, p = metoryx_side(model, hand_attention(kv_heads, rate), inputs, call)
    add_attention_peers(sides, p, inputs, kv_heads, rate, key)
    title = {"causal": "causal", "masked": "boolean mask", "GQA": f"GQA {kv_heads} kv heads"}
    label = title.get(variant, f"causal, dropout {DROPOUT_RATE}")
    return Case(f"MultiHeadAttention {HEADS}x{HEAD_DIM}, {label}", "8 x 128 x 256", sides)


def add_attention_peers(
    sides: dict[str, Side],
    p: Any,
    inputs: tuple[Any, ...],
    kv_heads: int,
    rate: float,
    key: jax.Array,
) -> None:
    q, k, v, o = (p[name] for name in ("query", "key", "value", "out"))
    x, mask = inputs[:2]

    def general(dense: Any, heads: int) -> dict[str, jax.Array]:  # DenseGeneral's layout
        return {
            "kernel": dense["kernel"].reshape(WIDTH, heads, HEAD_DIM),
            "bias": dense["bias"].reshape(heads, HEAD_DIM),
        }

    out = {"kernel": o["kernel"].reshape(HEADS, HEAD_DIM, WIDTH), "bias": o["bias"]}
    projections = {
        "query": general(q, HEADS),
        "key": general(k, kv_heads),
        "value": general(v, kv_heads),
        "out": out,
    }
    if nn is not None and kv_heads == HEADS:
        attention = nn.MultiHeadDotProductAttention(
            HEADS, qkv_features=WIDTH, dropout_rate=rate, broadcast_dropout=False
        )
        sides["Linen"] = linen_side(
            attention,
            {"params": projections},
            *inputs,
            rng_input=bool(rate),
            mask_input=True,
            deterministic=not rate,
        )
    if nnx is not None:
        layer = nnx.MultiHeadAttention(
            HEADS,
            WIDTH,
            WIDTH,
            num_kv_heads=kv_heads,
            dropout_rate=rate,
            broadcast_dropout=False,
            decode=False,
            rngs=rngs(),
        )
        for name, values in projections.items():
            nnx_set(layer, **{f"{name}.{leaf}": value for leaf, value in values.items()})

        def call(m: Any, x: jax.Array, mask: jax.Array, *key: jax.Array) -> jax.Array:
            if not rate:
                return m(x, mask=mask, deterministic=True)
            return m(x, mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=key[0]))

        sides["NNX"] = nnx_side(layer, call, *inputs)
    if eqx is not None and kv_heads == HEADS:
        attention = eqx.nn.MultiheadAttention(
            HEADS,
            WIDTH,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            dropout_p=rate,
            key=key,
        )
        attention = eqx_set(
            attention,
            **{
                f"{name}_proj.{leaf}": values[leaf].T if leaf == "weight" else values[leaf]
                for name, values in (
                    ("query", {"weight": q["kernel"], "bias": q["bias"]}),
                    ("key", {"weight": k["kernel"], "bias": k["bias"]}),
                    ("value", {"weight": v["kernel"], "bias": v["bias"]}),
                    ("output", {"weight": o["kernel"], "bias": o["bias"]}),
                )
                for leaf in ("weight", "bias")
            },
        )

        def eqx_call(m: Any, s: Any, x: jax.Array, mask: jax.Array, *key: jax.Array) -> tuple:
            if not rate:
                return jax.vmap(lambda x, mask: m(x, x, x, mask[0]))(x, mask), s
            keys = jax.random.split(key[0], x.shape[0])
            return jax.vmap(lambda x, mask, k: m(x, x, x, mask[0], key=k))(x, mask, keys), s

        sides["Equinox"] = eqx_side(attention, eqx_call, *inputs)
    if rate:
        for side in sides.values():
            side.to_ours = None
            side.note = "dropout draws its own random numbers: outputs not compared"


CASES: dict[str, Callable[[jax.Array], Case]] = {
    "Dense": dense_case,
    "Conv": conv_case,
    "ConvTranspose": conv_transpose_case,
    "LayerNorm": layer_norm_case,
    "RMSNorm": rms_norm_case,
    "BatchNorm": batch_norm_case,
    "GroupNorm": group_norm_case,
    "Embed": embed_case,
    "LSTM": lstm_case,
    "GRU": gru_case,
    # Past 8 rows RNN takes another derivative (per gate, or the LSTM's gates joined): its
    # own rows, at bench_layers' length.
    "LSTM, 32 rows": partial(lstm_case, batch=32, steps=128),
    "GRU, 32 rows": partial(gru_case, batch=32, steps=128),
    "MultiHeadAttention causal": partial(attention_case, variant="causal"),
    "MultiHeadAttention mask": partial(attention_case, variant="masked"),
    "MultiHeadAttention GQA": partial(attention_case, variant="GQA"),
    "MultiHeadAttention dropout": partial(attention_case, variant="dropout"),
}


# ---------------------------------------------------------------------------------------------
# Measuring.


def value_and_grad(fn: Fn, args: tuple[Any, ...]) -> Callable[..., Any]:
    """``value_and_grad`` of ``mean(fn(...)[0] ** 2)`` with respect to the parameters (if
    any) and the floating inputs; the new state is the auxiliary output."""
    floating = [
        2 + i
        for i, x in enumerate(args[2:])
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    argnums = ((0,) if jax.tree.leaves(args[0]) else ()) + tuple(floating)

    def loss(*args: Any) -> tuple[jax.Array, Any]:
        y, new_state = fn(*args)
        return jnp.mean(jnp.square(y)), new_state

    return jax.value_and_grad(loss, argnums, has_aux=True)


def relative_difference(a: Any, b: Any) -> float:
    """The largest ``|a - b|`` of the floating leaves of two results, each relative to its
    leaf's largest ``|a|``, or to a millionth of the largest ``|a|`` of all leaves where the
    leaf is smaller (a gradient that is 0 in exact arithmetic, such as that of the key bias
    of attention, is rounding noise on both sides)."""
    pairs = [
        (np.asarray(x, np.float64), np.asarray(y, np.float64))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    largest = max((float(np.abs(x).max()) for x, _ in pairs), default=0.0)
    worst = 0.0
    for x, y in pairs:
        scale = max(float(np.abs(x).max()), 1e-6 * largest, 1e-30)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst


def check(case: Case, pass_name: str, results: dict[str, Any], notes: list[str]) -> None:
    """Notes how far each side's output (forward) or loss (backward) is from metoryx's; the
    hand-written side's gradients are compared too (same parameter dict)."""
    ours = results["mx"]
    parts = []
    for name, side in case.sides.items():
        if name == "mx":
            continue
        if side.to_ours is None:
            parts.append(f"{name} not compared" + ("" if rate_note(case) else f" ({side.note})"))
            continue
        if pass_name == "forward":
            diff = relative_difference(ours[0], side.to_ours(results[name][0]))
        elif name == "hand":
            diff = relative_difference(ours, results[name])  # loss, state and gradients
        else:
            diff = relative_difference(ours[0][0], results[name][0][0])  # the loss
        parts.append(f"{name} {diff:.1e}" + (f" ({side.note})" if side.note else ""))
    what = "output" if pass_name == "forward" else "loss (and hand-written's gradients)"
    shared = rate_note(case)
    compared = ", ".join(parts) + (f" ({shared})" if shared else "")
    notes.append(f"{case.name}, {pass_name}: {what} vs metoryx: {compared}")


def rate_note(case: Case) -> str:
    """The note of a case whose sides are all left out of the check for the same reason."""
    others = [side for name, side in case.sides.items() if name != "mx"]
    reasons = {side.note for side in others}
    uncompared = all(side.to_ours is None for side in others)
    return reasons.pop() if uncompared and len(reasons) == 1 else ""


def measure(case: Case, pass_name: str, repeats: int, sample_s: float, notes: list[str]) -> dict:
    """Times one pass of one case on every side (and the hand-written side again, jitted a
    second time: the noise floor); returns the medians and paired ratios."""
    fns = {}
    for name, side in case.sides.items():
        fn = side.fn if pass_name == "forward" else value_and_grad(side.fn, side.args)
        fns[name] = (partial(fn), side.args)  # a new function: compiled anew at each call
    hand, hand_args = fns["hand"]
    fns["hand again"] = (lambda *args: hand(*args), hand_args)
    calls = {name: partial(jax.jit(fn), *args) for name, (fn, args) in fns.items()}
    results = {name: jax.block_until_ready(call()) for name, call in calls.items()}
    check(case, pass_name, results, notes)
    samplers = {
        name: call_sampler(call, max(1, round(sample_s / one_call(call))))
        for name, call in calls.items()
    }
    samples = interleaved(samplers, repeats)
    ratios = {name: paired(samples, name, "hand") for name in samples if name != "hand"}
    peers = [p for p in PEERS if p in samples and case.sides[p].same_semantics]
    fastest = min(peers, key=ratios.__getitem__) if peers else None
    margin = max(abs(ratios["hand again"] - 1), MIN_MARGIN)
    versus = paired(samples, "mx", fastest) if fastest else None
    slower = versus is not None and versus > 1 + margin
    # One program on both sides: a difference in time is the machine's noise, not metoryx.
    same = slower and optimized_program(*fns["mx"]) == optimized_program(*fns[fastest])
    return {
        "hand": statistics.median(samples["hand"]),
        "ratios": ratios,
        "fastest": fastest,
        "versus": versus,
        "margin": margin,
        "slower": slower and not same,
        "same": same,
    }


def row(case: Case, pass_name: str, m: dict[str, Any]) -> list[str]:
    ratios = m["ratios"]
    cells = [
        case.name,
        case.shape,
        pass_name,
        f"{m['hand'] * 1e6:,.0f}",
        f"{ratios['hand again']:.3f}",
        f"{ratios['mx']:.3f}",
    ]
    cells += [f"{ratios[p]:.3f}" if p in ratios else "—" for p in PEERS if p in present_peers()]
    if m["fastest"] is None:
        return [*cells, "—", "—"]
    versus = f"{m['fastest']} {m['versus']:.3f} (±{m['margin']:.2f})"
    verdict = "**slower**" if m["slower"] else "noise (same program)" if m["same"] else "ok"
    if "again" in m:  # found slower, then measured again
        again = m["again"]
        versus += f"; again {again['fastest']} {again['versus']:.3f} (±{again['margin']:.2f})"
        verdict = "**slower**" if m["slower"] else "ok (not confirmed)"
    return [*cells, versus, verdict]


def present_peers() -> list[str]:
    return [name for name, module in zip(PEERS, (nn, nnx, eqx), strict=True) if module is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer repeats")
    parser.add_argument(
        "--only", default="", help="run only the layers whose name contains this (any case)"
    )
    opts = parser.parse_args()
    repeats, sample_s = (5, 0.005) if opts.quick else (21, 0.03)
    started = time.perf_counter()
    versions = [m for m in (flax, eqx) if m is not None]
    print(header(mx, *versions))
    missing = [name for name in PEERS if name not in present_peers()]
    print(
        f"mode: {'quick' if opts.quick else 'default'}; {repeats} interleaved repeats of at "
        f"least {sample_s * 1e3:g} ms per side; hand-written: median µs per call; the other "
        f"columns: paired ratio to hand-written (median of per-repeat ratios); 'hand again' "
        f"is a second jit of the hand-written function (the noise floor)"
        + (f"; not installed: {', '.join(missing)}" if missing else "")
        + "\n",
        flush=True,
    )
    titles = ["layer", "input", "pass", "hand-written µs", "hand again", "metoryx"]
    titles += [*present_peers(), "metoryx / fastest peer (paired)", "verdict"]
    rows, notes, slower = [], [], []
    keys = iter(jax.random.split(jax.random.key(42), len(CASES)))
    for name, build in CASES.items():
        key = next(keys)
        if opts.only.lower() not in name.lower():
            continue
        t0 = time.perf_counter()
        case = build(key)
        for pass_name in PASSES:
            m = measure(case, pass_name, repeats, sample_s, notes)
            if m["slower"]:  # confirmed only by a second measurement (module docstring)
                m["again"] = measure(case, pass_name, repeats, sample_s, [])
                m["slower"] = m["again"]["slower"]
            rows.append(row(case, pass_name, m))
            if m["slower"]:
                versus = f"{m['fastest']} {m['versus']:.3f}, again {m['again']['versus']:.3f}"
                slower.append(f"{case.name}, {pass_name} ({versus})")
        print(f"  {case.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(markdown(titles, rows))
    print()
    for note in notes:
        print(note)
    print(
        f"\nmetoryx slower than the fastest peer beyond the noise floor: {len(slower)}"
        f"{': ' + '; '.join(slower) if slower else ''}. "
        f"Total time {time.perf_counter() - started:.0f} s."
    )
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
