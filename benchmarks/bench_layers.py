"""Each metoryx layer against the hand-written JAX that computes the same thing.

Run from the repository root::

    python benchmarks/bench_layers.py                # every layer (about 2 minutes on 2 cores)
    python benchmarks/bench_layers.py --quick        # a smoke run: batch 4, fewer repeats
    python benchmarks/bench_layers.py --only conv    # the layers whose name contains "conv"

Two jitted programs per layer and side: the forward pass, and the forward and backward pass
(``jax.value_and_grad`` of ``mean(y ** 2)`` with respect to the parameters and the floating
inputs). The metoryx side runs the layer through ``mx.transform``'s ``apply_fn`` (the pooling
functions and ``dot_product_attention``, which are functions, are called as they are); the
hand-written side takes the same parameter dict (``variables["params"]``) and inputs and makes
the ``lax``/``jax.nn``/``jnp`` calls a careful JAX user writes (``x @ w + b``,
``lax.conv_general_dilated``, ``jax.nn.dot_product_attention``, a ``lax.scan`` LSTM). Both sides
compute the same numbers: the script prints the largest relative difference of their outputs
and gradients.

As in ``bench_core.py``, the repeats of the sides are interleaved (A B, B A, ...) so that drift
of a noisy machine hits both alike; the table gives the medians (microseconds per call), the
ratio of the medians (metoryx / hand-written) and the median of the per-repeat ratios
("paired"), on which the verdict rests (target: paired <= 1.05). It also gives the number of
jaxpr equations of each side (through nested jaxprs, not counting the ``jit`` wrappers of
``jnp`` functions), marked "same" where the printed jaxprs are identical and "same XLA" where
the jaxprs differ (a reshape for a broadcast, say) but XLA compiles both to the same optimized
HLO, names and source locations aside (one program either way, so any difference in time is
noise: such a row that misses the target is marked "noise", not failed);
where the primitives differ, the notes below the table say how. The exit status is 1 if a
target is failed.

The attention and recurrent layers get a third column, PyTorch on the CPU with as many threads
as JAX has CPUs (``torch.nn.functional.scaled_dot_product_attention``, ``MultiheadAttention``,
``LSTM``, ``GRU``; the forward pass under ``inference_mode``), timed in the same interleaved
repeats, as a reference point only; the column is left out when torch is not installed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import cached_property, partial
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
    walk_eqns,
)

import metoryx as mx  # noqa: E402
from metoryx import (  # noqa: E402
    RNN,
    GRUCell,
    LSTMCell,
    MultiHeadAttention,
    dot_product_attention,
)

# PyTorch's OpenMP threads spin while they wait by default; on a machine shared with JAX's
# threads (and other jobs) that costs it up to 10x. Passive waiting is its fair setting here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
except ImportError:
    torch = None

TARGET = 1.05
PASSES = ("forward", "forward+backward")
DROPOUT_RATE = 0.1
HEADS = 8
HIDDEN = 128  # of the recurrent cells
_NHWC = ("NHWC", "HWIO", "NHWC")

# (params, state, *inputs) -> (output, new state); ``state`` holds the non-"params" collections.
Fn = Callable[..., tuple[Any, dict[str, Any]]]


@dataclasses.dataclass
class Layer:
    """One layer on both sides: the two functions, their inputs, and a PyTorch twin."""

    name: str
    ours: Fn
    hand: Fn
    inputs: tuple[jax.Array, ...]
    # The initial variables, built on first use (so that --only skips the others' init).
    init: Callable[[], dict[str, Any]] = dict
    # Builds {pass: a call of the PyTorch twin}; None where there is no reference to time.
    torch: Callable[[], dict[str, Callable[[], Any]]] | None = None

    @cached_property
    def args(self) -> tuple[Any, ...]:
        """``(params, state, *inputs)``: the arguments of both sides."""
        variables = self.init()
        state = {c: v for c, v in variables.items() if c != "params"}
        return (variables.get("params", {}), state, *self.inputs)


def stateless(fn: Callable[..., jax.Array]) -> Fn:
    """``fn(params, *inputs) -> y`` as an ``Fn`` with no state."""

    def run(params: Any, state: dict[str, Any], *inputs: jax.Array) -> tuple[jax.Array, dict]:
        return fn(params, *inputs), {}

    return run


def module_layer(
    name: str,
    model: mx.Module,
    hand: Fn,
    inputs: tuple[jax.Array, ...],
    *,
    method: str | None = None,
    dropout_key: bool = False,
    torch_twin: Callable[..., dict[str, Callable[[], Any]]] | None = None,
    **kwargs: Any,
) -> Layer:
    """A module layer: metoryx runs ``apply_fn``; with ``dropout_key`` the last input is the
    key of the ``"dropout"`` stream. ``torch_twin(*inputs)`` builds the PyTorch calls."""
    init_fn, apply_fn = mx.transform(model, method)

    def ours(params: Any, state: dict[str, Any], *inputs: jax.Array) -> tuple[Any, dict]:
        variables = {"params": params, **state} if params else state
        rngs = mx.PRNGKeys(dropout=inputs[-1]) if dropout_key else None
        y, new = apply_fn(variables, rngs, *inputs[: len(inputs) - dropout_key], **kwargs)
        return y, {c: new[c] for c in state}

    twin = None if torch_twin is None else partial(torch_twin, *inputs)
    return Layer(name, ours, hand, inputs, partial(init_fn, jax.random.key(0)), twin)


def function_layer(
    name: str,
    fn: Callable[..., jax.Array],
    hand: Callable[..., jax.Array],
    inputs: tuple[jax.Array, ...],
    torch_twin: Callable[..., dict[str, Callable[[], Any]]] | None = None,
) -> Layer:
    """A function layer (no variables): both sides take the inputs only."""
    twin = None if torch_twin is None else partial(torch_twin, *inputs)
    ours = stateless(lambda p, *xs: fn(*xs))
    return Layer(name, ours, stateless(lambda p, *xs: hand(*xs)), inputs, torch=twin)


# ---------------------------------------------------------------------------------------------
# The hand-written side: what a careful JAX user writes over the same parameter dict.


def hand_conv(dims: tuple[str, str, str], groups: int = 1) -> Callable[..., jax.Array]:
    def conv(p: Any, x: jax.Array) -> jax.Array:
        ndim = len(dims[0]) - 2
        y = lax.conv_general_dilated(
            x,
            p["kernel"],
            (1,) * ndim,
            "SAME",
            dimension_numbers=dims,
            feature_group_count=groups,
        )
        return y + p["bias"]

    return conv


def hand_conv_transpose(p: Any, x: jax.Array) -> jax.Array:
    # PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1): the kernel is not flipped in
    # the parameters, so it is flipped here; (kernel - 1 - padding) zeros on each side.
    kernel = lax.rev(p["kernel"], (0, 1))
    y = lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_NHWC)
    return y + p["bias"]


def hand_group_norm(groups: int) -> Callable[..., jax.Array]:
    def group_norm(p: Any, x: jax.Array) -> jax.Array:
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        y = standardize(grouped, (*range(1, x.ndim - 1), x.ndim)).reshape(x.shape)
        return y * p["scale"] + p["bias"]

    return group_norm


def hand_instance_norm(p: Any, x: jax.Array) -> jax.Array:
    return standardize(x, tuple(range(1, x.ndim - 1))) * p["scale"] + p["bias"]


def hand_dropout(p: Any, x: jax.Array, key: jax.Array) -> jax.Array:
    # metoryx folds a per-call counter into the stream's key (one scalar fold_in); the same
    # fold here draws the same mask, so that the outputs can be compared.
    keep = jax.random.bernoulli(jax.random.fold_in(key, 0), 1 - DROPOUT_RATE, x.shape)
    return lax.select(keep, x / (1 - DROPOUT_RATE), jnp.zeros_like(x))


def hand_max_pool(x: jax.Array) -> jax.Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def hand_avg_pool(window: int) -> Callable[[jax.Array], jax.Array]:
    def avg_pool(x: jax.Array) -> jax.Array:
        dims = (1, window, window, 1)
        return lax.reduce_window(x, 0.0, lax.add, dims, dims, "VALID") / window**2

    return avg_pool


def hand_adaptive_avg_pool(out: int) -> Callable[[jax.Array], jax.Array]:
    """PyTorch's windows, one slice and mean per output cell: what a user writes when the
    output size does not divide the input size."""

    def pool(x: jax.Array) -> jax.Array:
        n = x.shape[1]
        bounds = [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]
        rows = [
            jnp.stack([x[:, a:b, c:d].mean((1, 2)) for c, d in bounds], axis=1) for a, b in bounds
        ]
        return jnp.stack(rows, axis=1)

    return pool


def hand_prelu(p: Any, x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, x, p["weight"] * x)


def hand_mlp(p: Any, x: jax.Array) -> jax.Array:
    hidden, out = p["layers"]["0"], p["layers"]["1"]
    return jax.nn.relu(x @ hidden["kernel"] + hidden["bias"]) @ out["kernel"] + out["bias"]


def hand_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def hand_multi_head_attention(p: Any, x: jax.Array) -> jax.Array:
    b, t, d = x.shape

    def heads(name: str) -> jax.Array:
        return hand_dense(p[name], x).reshape(b, t, HEADS, d // HEADS)

    attended = jax.nn.dot_product_attention(heads("query"), heads("key"), heads("value"))
    return hand_dense(p["out"], attended.reshape(b, t, d))


def hand_rnn(
    step: Callable[..., tuple[Any, jax.Array]], carry: Callable[[jax.Array], Any]
) -> Callable[..., jax.Array]:
    """A ``lax.scan`` over time of ``step(cell params, carry, projected input)`` from the
    carry ``carry(zeros)``, the input projection of all steps done at once before the scan."""

    def rnn(p: Any, x: jax.Array) -> jax.Array:
        cell = p["cell"]
        projected = jnp.swapaxes(x, 0, 1) @ cell["input_kernel"] + cell["input_bias"]
        init = carry(jnp.zeros((x.shape[0], HIDDEN), x.dtype))
        _, hs = lax.scan(partial(step, cell), init, projected)
        return jnp.swapaxes(hs, 0, 1)

    return rnn


def lstm_step(cell: Any, carry: tuple[jax.Array, jax.Array], xp: jax.Array) -> tuple[Any, Any]:
    h, c = carry
    i, f, g, o = jnp.split(xp + h @ cell["recurrent_kernel"] + cell["recurrent_bias"], 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


# ---------------------------------------------------------------------------------------------
# PyTorch twins (reference timings only; their weights are PyTorch's own random ones).


def torch_passes(forward: Callable[[], Any], leaves: list[Any]) -> dict[str, Callable[[], Any]]:
    """The forward pass under ``inference_mode``, and forward and backward of ``mean(y**2)``
    into the ``.grad`` of ``leaves`` (cleared first, as ``zero_grad(set_to_none=True)``)."""

    def infer() -> Any:
        with torch.inference_mode():
            return forward()

    def train() -> Any:
        for leaf in leaves:
            leaf.grad = None
        loss = forward().square().mean()
        loss.backward()
        return loss

    return dict(zip(PASSES, (infer, train), strict=True))


def to_torch(x: jax.Array) -> Any:
    return torch.tensor(np.asarray(x)).requires_grad_()


def torch_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> dict[str, Callable[[], Any]]:
    # PyTorch's layout is (batch, heads, T, head_dim).
    tq, tk, tv = (to_torch(jnp.swapaxes(a, 1, 2)) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return torch_passes(lambda: sdpa(tq, tk, tv, is_causal=True), [tq, tk, tv])


def torch_module(module: Any, call: Callable[[Any, Any], Any]) -> Callable[..., dict]:
    """The twin builder of a ``torch.nn`` module applied as ``call(module, x)``."""

    def twin(x: jax.Array) -> dict[str, Callable[[], Any]]:
        tx = to_torch(x)
        return torch_passes(lambda: call(module, tx), [*module.parameters(), tx])

    return twin


# ---------------------------------------------------------------------------------------------
# The layers and their inputs.


def layers(batch: int) -> list[Layer]:
    """Every layer with its inputs: ``batch`` x 16 tokens of 256 features, 32x32 images of 32
    channels, sequences of 128 (64 features for the RNNs, 8 heads of 32 for attention). The
    slower layers get a fraction of the batch: a quarter for attention and the 2-d
    convolutions, an eighth for the transposed one, a sixteenth for the grouped and 3-d ones
    (XLA's CPU backward of grouped convolutions is slow)."""
    keys = iter(jax.random.split(jax.random.key(42), 16))

    def normal(fraction: int, *shape: int) -> jax.Array:
        """Samples of shape ``(batch // fraction, *shape)``."""
        return jax.random.normal(next(keys), (max(1, batch // fraction), *shape), jnp.float32)

    tokens = normal(1, 16, 256)
    images = normal(1, 32, 32, 32)
    small_images = images[: max(1, batch // 4)]
    tiny_images = images[: max(1, batch // 16)]
    ids = jax.random.randint(next(keys), (batch, 128), 0, 1024, jnp.int32)
    qkv = tuple(normal(4, 128, HEADS, 32) for _ in range(3))
    sequence = normal(1, 128, 64)
    conv2d = hand_conv(_NHWC)

    result = [
        module_layer("Dense 256→256", mx.Dense(256, 256), stateless(hand_dense), (tokens,)),
        module_layer(
            "Einsum btd,dhk->bthk",
            mx.Einsum("btd,dhk->bthk", (256, HEADS, 32), bias_shape=(HEADS, 32)),
            stateless(lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["kernel"]) + p["bias"]),
            (tokens,),
        ),
        module_layer(
            "Embed 1024x256 lookup",
            mx.Embed(1024, 256),
            # jnp.take's fill mode, as Embed: a bad id gives a NaN row. Indexing
            # (``table[ids]``) clamps bad ids silently; its scatter-add backward is ~1.6x faster
            # on CPU (docs/benchmarks.md).
            stateless(lambda p, ids: jnp.take(p["embedding"], ids, axis=0)),
            (ids,),
        ),
        module_layer(
            "Embed 1024x256 attend",
            mx.Embed(1024, 256),
            stateless(lambda p, x: x @ p["embedding"].T),
            (tokens,),
            method="attend",
        ),
        module_layer(
            "Conv 1d k3 64→64",
            mx.Conv(64, 64, 3),
            stateless(hand_conv(("NWC", "WIO", "NWC"))),
            (sequence,),
        ),
        module_layer(
            "Conv 2d 3x3 32→32",
            mx.Conv(32, 32, (3, 3)),
            stateless(conv2d),
            (small_images,),
        ),
        module_layer(
            "Conv 2d 3x3 groups=4",
            mx.Conv(32, 32, (3, 3), groups=4),
            stateless(hand_conv(_NHWC, groups=4)),
            (tiny_images,),
        ),
        module_layer(
            "Conv 2d 3x3 depthwise",
            mx.Conv(32, 32, (3, 3), groups=32),
            stateless(hand_conv(_NHWC, groups=32)),
            (tiny_images,),
        ),
        module_layer(
            "Conv 3d 3x3x3 16→16",
            mx.Conv(16, 16, (3, 3, 3)),
            stateless(hand_conv(("NDHWC", "DHWIO", "NDHWC"))),
            (normal(16, 16, 16, 16, 16),),
        ),
        module_layer(
            "ConvTranspose 2d 4x4 s2 32→16",
            mx.ConvTranspose(32, 16, (4, 4), strides=2, padding=1),
            stateless(hand_conv_transpose),
            (normal(8, 16, 16, 32),),
        ),
        module_layer(
            "BatchNorm train",
            mx.BatchNorm(32, momentum=MOMENTUM, epsilon=EPSILON),
            hand_batch_norm,
            (images,),
            is_training=True,
        ),
        module_layer("LayerNorm 256", mx.LayerNorm(256), stateless(hand_layer_norm), (tokens,)),
        module_layer("RMSNorm 256", mx.RMSNorm(256), stateless(hand_rms_norm), (tokens,)),
        module_layer(
            "GroupNorm 8 groups",
            mx.GroupNorm(8, 32),
            stateless(hand_group_norm(8)),
            (images,),
        ),
        module_layer("InstanceNorm", mx.InstanceNorm(32), stateless(hand_instance_norm), (images,)),
        module_layer(
            f"Dropout {DROPOUT_RATE} train",
            mx.Dropout(DROPOUT_RATE),
            stateless(hand_dropout),
            (tokens, jax.random.key(1)),
            dropout_key=True,
            is_training=True,
        ),
        function_layer(
            "max_pool 2x2", partial(mx.max_pool, kernel_size=(2, 2)), hand_max_pool, (images,)
        ),
        function_layer(
            "avg_pool 2x2",
            partial(mx.avg_pool, kernel_size=(2, 2)),
            hand_avg_pool(2),
            (images,),
        ),
        function_layer(
            "adaptive_avg_pool 32→8",
            partial(mx.adaptive_avg_pool, output_size=(8, 8)),
            hand_avg_pool(4),
            (images,),
        ),
        function_layer(
            "adaptive_avg_pool 32→5",
            partial(mx.adaptive_avg_pool, output_size=(5, 5)),
            hand_adaptive_avg_pool(5),
            (images,),
        ),
        module_layer("PReLU 32", mx.PReLU(32), stateless(hand_prelu), (images,)),
        module_layer("MLP 256-1024-256", mx.MLP(256, [1024], 256), stateless(hand_mlp), (tokens,)),
        function_layer(
            "dot_product_attention causal",
            partial(dot_product_attention, is_causal=True),
            hand_attention,
            qkv,
            torch_twin=torch_attention if torch else None,
        ),
        module_layer(
            "MultiHeadAttention 8 heads",
            MultiHeadAttention(HEADS, 256),
            stateless(hand_multi_head_attention),
            (normal(4, 128, 256),),
            torch_twin=torch_module(
                torch.nn.MultiheadAttention(256, HEADS, batch_first=True),
                lambda m, x: m(x, x, x, need_weights=False)[0],
            )
            if torch
            else None,
        ),
    ]
    for name, cell, torch_rnn, step, carry in (
        ("RNN(LSTMCell) 64→128", LSTMCell(64, HIDDEN), "LSTM", lstm_step, lambda z: (z, z)),
        ("RNN(GRUCell) 64→128", GRUCell(64, HIDDEN), "GRU", gru_step, lambda z: z),
    ):
        twin = None
        if torch:
            module = getattr(torch.nn, torch_rnn)(64, HIDDEN, batch_first=True)
            twin = torch_module(module, lambda m, x: m(x)[0])
        result.append(
            module_layer(
                name, RNN(cell), stateless(hand_rnn(step, carry)), (sequence,), torch_twin=twin
            )
        )
    return result


# ---------------------------------------------------------------------------------------------
# Measuring one layer.


def value_and_grad(fn: Fn, layer: Layer) -> Callable[..., Any]:
    """``value_and_grad`` of ``mean(fn(...)[0] ** 2)`` with respect to the parameters (if
    any) and the floating inputs; the new state is returned as auxiliary output."""
    floating = [2 + i for i, x in enumerate(layer.inputs) if jnp.issubdtype(x.dtype, jnp.floating)]
    argnums = ((0,) if layer.args[0] else ()) + tuple(floating)

    def loss(*args: Any) -> tuple[jax.Array, dict[str, Any]]:
        y, new_state = fn(*args)
        return jnp.mean(jnp.square(y)), new_state

    return jax.value_and_grad(loss, argnums, has_aux=True)


def primitives(closed_jaxpr: Any) -> list[str]:
    """The primitive names of a jaxpr, through nested jaxprs, without the ``jit`` wrappers
    that some ``jnp`` functions add around their equations."""
    names = (e.primitive.name for e in walk_eqns(closed_jaxpr.jaxpr))
    return [name for name in names if name not in ("jit", "pjit")]


def differences(hand: list[str], ours: list[str]) -> str:
    """How metoryx's primitives differ from the hand-written ones, e.g. ``+1 transpose``."""
    more = collections.Counter(ours) - collections.Counter(hand)
    fewer = collections.Counter(hand) - collections.Counter(ours)
    return ", ".join(
        [f"+{n} {p}" for p, n in sorted(more.items())]
        + [f"-{n} {p}" for p, n in sorted(fewer.items())]
    )


def relative_difference(a: Any, b: Any) -> float:
    """The largest ``|a - b| / max|a|`` over the floating leaves of two results."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def measure(
    layer: Layer, pass_name: str, repeats: int, sample_s: float, notes: list[str]
) -> tuple[list[str], str]:
    """Times one pass of one layer; returns its table cells and its verdict."""
    make = (lambda fn: fn) if pass_name == "forward" else partial(value_and_grad, layer=layer)
    args = layer.args
    sides = {"hand": make(layer.hand), "mx": make(layer.ours)}
    calls: dict[str, Callable[[], Any]] = {
        side: partial(jax.jit(fn), *args) for side, fn in sides.items()
    }
    results = {side: jax.block_until_ready(call()) for side, call in calls.items()}  # compile
    if layer.torch is not None:
        calls["torch"] = layer.torch()[pass_name]
        calls["torch"]()  # warm up

    label = f"{layer.name}, {pass_name}"
    diff = relative_difference(results["hand"], results["mx"])
    compared = "outputs" if pass_name == "forward" else "outputs and gradients"
    notes.append(f"{label}: {compared} agree to {diff:.1e} (largest relative difference)")
    jaxprs = {side: jax.make_jaxpr(fn)(*args) for side, fn in sides.items()}
    prims = {side: primitives(jaxpr) for side, jaxpr in jaxprs.items()}
    same = str(jaxprs["hand"]) == str(jaxprs["mx"])
    same_xla = same or len({optimized_program(fn, args) for fn in sides.values()}) == 1
    if not same:
        changed = differences(prims["hand"], prims["mx"]) or (
            "the same primitives, in another order or with other parameters"
        )
        notes[-1] += f"; jaxpr: metoryx {changed}"
        if same_xla:
            notes[-1] += ", which XLA compiles to the same program"

    samplers = {
        side: call_sampler(call, max(1, round(sample_s / one_call(call))))
        for side, call in calls.items()
    }
    samples = interleaved(samplers, repeats)
    median = {side: statistics.median(s) for side, s in samples.items()}
    pair = paired(samples)
    # One program on both sides: a missed target there is the machine's noise, not metoryx.
    verdict = "pass" if pair <= TARGET else "noise" if same_xla else "**FAIL**"
    cells = [
        layer.name,
        " x ".join(str(d) for d in layer.inputs[0].shape),
        pass_name,
        f"{median['hand'] * 1e6:,.0f}",
        f"{median['mx'] * 1e6:,.0f}",
        f"{median['mx'] / median['hand']:.3f}",
        f"{pair:.3f}",
        f"{median['torch'] * 1e6:,.0f}" if "torch" in median else "—",
        f"{len(prims['hand'])} / {len(prims['mx'])}"
        + (", same" if same else ", same XLA" if same_xla else ""),
        verdict,
    ]
    return cells, verdict


TITLES = [
    "layer",
    "input",
    "pass",
    "hand-written µs",
    "metoryx µs",
    "ratio",
    "paired",
    "PyTorch µs",
    "jaxpr eqns hand / mx",
    f"paired ≤ {TARGET}",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: batch 4, fewer repeats, XLA's lowest optimization level",
    )
    parser.add_argument(
        "--only", default="", help="run only the layers whose name contains this (any case)"
    )
    opts = parser.parse_args()
    batch, repeats, sample_s = (4, 3, 0.003) if opts.quick else (32, 21, 0.02)
    if opts.quick:  # compiling is most of a smoke run: a lower XLA optimization level halves it
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        )
    started = time.perf_counter()
    if torch is not None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(threads)
    versions = (torch,) if torch is not None else ()
    print(header(mx, *versions))
    print(
        f"mode: {'quick (XLA optimization level 0)' if opts.quick else 'default'}; batch "
        f"{batch}; {repeats} interleaved repeats of at least {sample_s * 1e3:g} ms per side; "
        f"medians in µs per call; ratio = metoryx / hand-written, of medians, and paired "
        f"(median of per-repeat ratios, the verdict)"
        + ("" if torch is not None else "; torch not installed: no PyTorch column")
        + "\n",
        flush=True,
    )
    rows, notes = [], []
    verdicts: dict[str, list[str]] = collections.defaultdict(list)
    for layer in layers(batch):
        if opts.only.lower() not in layer.name.lower():
            continue
        t0 = time.perf_counter()
        for pass_name in PASSES:
            cells, verdict = measure(layer, pass_name, repeats, sample_s, notes)
            rows.append(cells)
            verdicts[verdict].append(f"{layer.name}, {pass_name}")
        print(f"  {layer.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    print(markdown(TITLES, rows))
    print()
    for note in notes:
        print(note)
    failed, noise = verdicts["**FAIL**"], verdicts["noise"]
    print(
        f"\n{len(failed)} target(s) failed{': ' + '; '.join(failed) if failed else ''}. "
        f"{len(noise)} missed by the same program on both sides (noise)"
        f"{': ' + '; '.join(noise) if noise else ''}. "
        f"Total time {time.perf_counter() - started:.0f} s."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
