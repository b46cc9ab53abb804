"""Framework overhead of metoryx against hand-written JAX doing the same math.

Run from the repository root::

    python benchmarks/bench_core.py           # the recorded numbers (docs/benchmarks.md)
    python benchmarks/bench_core.py --quick   # a fast smoke run, fewer repeats

Both sides are measured in one run, their repeats interleaved (A B, B A, ...) so that drift of a
noisy machine hits both alike; the table gives medians, the ratio of the medians (metoryx /
hand-written) and the median of the per-repeat ratios ("paired"), on which the verdict rests.
The hand-written side is a dict of arrays with exactly the structure of metoryx's
``variables["params"]`` and the ``lax``/``jnp`` calls a careful JAX user writes, so the two
programs can be compared equation by equation. Measured:

(a) jaxpr equations of the jitted train step (``value_and_grad`` of softmax cross-entropy,
    ``optax.sgd``, ``optax.apply_updates``) of a 784-512-512-10 MLP and of the issue's ConvNet;
(b) per-call time of that jitted step at batch 32, for the small MLP and a 100-layer width-64 MLP;
(c) trace time of the 100-layer step (a fresh ``jax.jit`` wrapper and step function each time);
(d) ``mx.transform`` + eager ``init_fn`` of a 1,000-layer model against a loop of ``jax.random``;
(e) the un-jitted (eager) forward pass of the small and of the 100-layer MLP;
(f) trace+compile of ``jax.jit(init_fn)`` of a 3- and a 100-layer ``Dense(64, 64)`` MLP, each
    side against itself at 3 layers: metoryx draws alike variables together, the hand-written
    loop draws each kernel alone (the issue measured 6.9 s against 0.57 s for that loop), and a
    hand-written batched draw (one ``lax.map``, split with ``jnp.unstack``) shows what the
    split into 100 arrays costs XLA:CPU when it is written with slices.

``--profile`` adds a cProfile of the eager 100-layer apply: where metoryx's own Python time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _timing import call_sampler, header, interleaved, markdown, paired, walk_eqns  # noqa: E402

import metoryx as mx  # noqa: E402

BATCH = 32
SMALL = (784, 512, 512, 10)
DEEP = (64,) * 101  # 100 Dense(64, 64) layers
INIT_LAYERS = 1000
DROPOUT_RATE = 0.5
LEARNING_RATE = 0.01


# ---------------------------------------------------------------------------------------------
# The models, metoryx side.


class MLP(mx.Module):
    """Dense layers with ReLU between them."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        self.layers = [mx.Dense(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = mx.relu(layer(x))
        return self.layers[-1](x)


class ConvNet(mx.Module):
    """The ConvNet of the issue (28x28x1 inputs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = mx.Conv(1, 32, kernel_size=(3, 3), strides=(1, 1), padding="SAME")
        self.conv2 = mx.Conv(32, 64, kernel_size=(3, 3), strides=(1, 1), padding="SAME")
        self.fc1 = mx.Dense(7 * 7 * 64, 128)
        self.fc2 = mx.Dense(128, 10)

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        x = mx.max_pool(mx.relu(self.conv1(x)), kernel_size=(2, 2), strides=(2, 2))
        x = mx.max_pool(mx.relu(self.conv2(x)), kernel_size=(2, 2), strides=(2, 2))
        x = mx.dropout(x.reshape((x.shape[0], -1)), rate=DROPOUT_RATE, is_training=is_training)
        return self.fc2(mx.relu(self.fc1(x)))


class Stack(mx.Module):
    """Many Dense(64, 64) layers in a list: the model of the transform + init measure."""

    def __init__(self, n: int):
        super().__init__()
        self.layers = [mx.Dense(64, 64) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The same models, hand-written: a dict of arrays with the structure of variables["params"].


def hand_mlp(params: dict[str, Any], x: jax.Array) -> jax.Array:
    layers = params["layers"]
    n = len(layers)
    for i in range(n):
        p = layers[str(i)]
        x = x @ p["kernel"] + p["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def _stream_words(name: str) -> tuple[int, int]:
    """The two 32-bit words metoryx folds into the default key to derive a named stream.

    metoryx derives the "dropout" stream from the key given to apply_fn with the 64-bit
    BLAKE2b hash of ("stream", name), then folds in a per-call counter. The hand-written
    step derives its dropout key the same way, so both draw the same mask and the losses
    must agree exactly (checked below). `hand_convnet(..., same_key=False)` is what a user
    writes who passes the dropout key straight in.
    """
    digest = hashlib.blake2b(f"stream/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


_DROPOUT_WORDS = _stream_words("dropout")
_NHWC = ("NHWC", "HWIO", "NHWC")


def hand_convnet(
    params: dict[str, Any], key: jax.Array, x: jax.Array, is_training: bool, same_key: bool = True
) -> jax.Array:
    def conv(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=_NHWC)
        return y + p["bias"]

    def pool(x: jax.Array) -> jax.Array:
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    x = pool(jax.nn.relu(conv(params["conv1"], x)))
    x = pool(jax.nn.relu(conv(params["conv2"], x)))
    x = x.reshape((x.shape[0], -1))
    if is_training:
        if same_key:
            high, low = _DROPOUT_WORDS
            key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, high), low), 0)
        keep_prob = 1.0 - DROPOUT_RATE
        keep = jax.random.bernoulli(key, keep_prob, x.shape)
        x = lax.select(keep, x / keep_prob, jnp.zeros_like(x))
    fc1, fc2 = params["fc1"], params["fc2"]
    x = jax.nn.relu(x @ fc1["kernel"] + fc1["bias"])
    return x @ fc2["kernel"] + fc2["bias"]


# ---------------------------------------------------------------------------------------------
# Train steps. Each factory returns a fresh function object on every call, so that a new
# jax.jit wrapper around it starts with empty caches (the trace-time measure relies on it).

Forward = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, key, x) -> logits


def make_step(forward: Forward, optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    def train_step(params, opt_state, key, x, labels):
        def loss_fn(p):
            logits = forward(p, key, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def mx_forward(apply_fn: Callable[..., Any], **kwargs: Any) -> Forward:
    def forward(p, key, x):
        return apply_fn({"params": p}, key, x, **kwargs)[0]

    return forward


class Case:
    """One model on both sides: parameters, inputs and forward functions."""

    def __init__(self, name: str, model: mx.Module, hand: Forward, mx_kwargs: dict, shape: tuple):
        self.name = name
        self.init_fn, self.apply_fn = mx.transform(model)
        self.params = self.init_fn(jax.random.key(0))["params"]
        self.optimizer = optax.sgd(LEARNING_RATE)
        self.opt_state = self.optimizer.init(self.params)
        kx, ky = jax.random.split(jax.random.key(42))
        self.x = jax.random.normal(kx, (BATCH, *shape), jnp.float32)
        self.labels = jax.random.randint(ky, (BATCH,), 0, 10, jnp.int32)
        self.key = jax.random.key(1)
        self.mx_kwargs = mx_kwargs
        self.hand = hand

    def args(self) -> tuple:
        return self.params, self.opt_state, self.key, self.x, self.labels

    def step(self, side: str) -> Callable[..., Any]:
        if side == "mx":
            return make_step(mx_forward(self.apply_fn, **self.mx_kwargs), self.optimizer)
        return make_step(self.hand, self.optimizer)


def mlp_case(name: str, sizes: tuple[int, ...]) -> Case:
    return Case(name, MLP(sizes), lambda p, k, x: hand_mlp(p, x), {}, (sizes[0],))


def convnet_case() -> Case:
    def hand(p, k, x):
        return hand_convnet(p, k, x, is_training=True)

    return Case("ConvNet", ConvNet(), hand, {"is_training": True}, (28, 28, 1))


# ---------------------------------------------------------------------------------------------
# Measurement helpers.


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


TITLES = ["measure", "hand-written", "metoryx", "ratio", "paired", "target", "result"]


class Row:
    def __init__(
        self,
        measure: str,
        hand: str,
        ours: str,
        ratio: float | None,
        target: str,
        ok: bool | None,
        paired_ratio: float | None = None,
    ):
        self.ok = ok
        self.cells = [
            measure,
            hand,
            ours,
            "—" if ratio is None else f"{ratio:.3f}",
            "—" if paired_ratio is None else f"{paired_ratio:.3f}",
            target,
            {True: "pass", False: "**FAIL**", None: "—"}[ok],
        ]


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def ratio_row(measure: str, samples: dict[str, list[float]], target: float | None) -> Row:
    """Medians of both sides, their ratio, and the verdict on the paired ratio.

    The verdict uses the median of the per-repeat ratios: each repeat times both sides back to
    back, so a load change between repeats cancels in its ratio but not in the ratio of medians.
    """
    hand, ours = statistics.median(samples["hand"]), statistics.median(samples["mx"])
    pair = paired(samples)
    ok = None if target is None else pair <= target
    return Row(
        measure,
        fmt_time(hand),
        fmt_time(ours),
        ours / hand,
        "—" if target is None else f"≤ {target:g}",
        ok,
        pair,
    )


# ---------------------------------------------------------------------------------------------
# The measures.


def measure_jaxprs(cases: list[Case], notes: list[str]) -> list[Row]:
    rows = []
    for case in cases:
        jaxprs = {
            side: jax.make_jaxpr(jax.jit(case.step(side)))(*case.args()) for side in ("hand", "mx")
        }
        eqns = {side: list(walk_eqns(j.jaxpr)) for side, j in jaxprs.items()}
        counts = {side: len(e) for side, e in eqns.items()}
        prims = {side: [e.primitive.name for e in es] for side, es in eqns.items()}
        same_prims = prims["hand"] == prims["mx"]
        same_text = str(jaxprs["hand"]) == str(jaxprs["mx"])
        rows.append(
            Row(
                f"(a) jaxpr equations, train step, {case.name}",
                str(counts["hand"]),
                str(counts["mx"]),
                counts["mx"] / counts["hand"],
                "equal",
                counts["hand"] == counts["mx"],
            )
        )
        notes.append(
            f"(a) {case.name}: primitive sequences identical: {'yes' if same_prims else 'NO'}; "
            f"jaxpr text identical: {'yes' if same_text else 'no'}."
        )
        if not same_prims:
            at = next(
                (
                    i
                    for i, (h, m) in enumerate(zip(prims["hand"], prims["mx"], strict=False))
                    if h != m
                ),
                min(counts.values()),
            )
            notes.append(
                f"    first difference at equation {at}: hand-written "
                f"{prims['hand'][at : at + 3]}, metoryx {prims['mx'][at : at + 3]}"
            )
        # Same numbers, too: the steps compute the same loss from the same inputs.
        losses = {side: float(jax.jit(case.step(side))(*case.args())[2]) for side in ("hand", "mx")}
        notes.append(
            f"    loss hand-written {losses['hand']:.6f}, metoryx {losses['mx']:.6f}: "
            f"{'identical' if losses['hand'] == losses['mx'] else 'DIFFERENT'}."
        )
        if case.name == "ConvNet":
            raw = make_step(
                lambda p, k, x: hand_convnet(p, k, x, True, same_key=False), case.optimizer
            )
            n_raw = len(list(walk_eqns(jax.make_jaxpr(jax.jit(raw))(*case.args()).jaxpr)))
            rows.append(
                Row(
                    "(a) ... ConvNet, hand-written passing its key to dropout as is",
                    str(n_raw),
                    str(counts["mx"]),
                    counts["mx"] / n_raw,
                    "—",
                    None,
                )
            )
    return rows


def measure_step_time(cases: list[Case], repeats: int, calls: int, notes: list[str]) -> list[Row]:
    rows = []
    for case in cases:
        # "hand again" is a second jit of the hand-written step: hand-written against itself
        # shows how far apart two runs of one program land on this machine (the noise floor).
        steps = {side: jax.jit(case.step(side)) for side in ("hand", "mx")}
        steps["hand again"] = jax.jit(case.step("hand"))

        for step in steps.values():  # compile
            jax.block_until_ready(step(*case.args()))
        samples = interleaved(
            {side: step_sampler(step, case.args(), calls) for side, step in steps.items()}, repeats
        )
        rows.append(ratio_row(f"(b) jitted train step, per call, {case.name}", samples, 1.03))
        floor = {"hand": samples["hand"], "mx": samples["hand again"]}
        rows.append(
            ratio_row(f"(b) ... noise floor: hand-written against itself, {case.name}", floor, None)
        )
        notes.append(
            f"(b) {case.name}: median of per-repeat ratios {paired(samples):.3f}, "
            f"hand-written against itself {paired(floor):.3f} ({repeats} repeats x "
            f"{calls} calls, three sides interleaved)."
        )
    return rows


def step_sampler(step: Callable[..., Any], args: tuple, calls: int) -> Callable[[], float]:
    """A sampler of the time per call of a jitted train step, fed its own outputs."""

    def sample() -> float:
        params, opt_state, key, x, labels = args
        start = time.perf_counter()
        for _ in range(calls):
            params, opt_state, loss = step(params, opt_state, key, x, labels)
        jax.block_until_ready((params, loss))
        return (time.perf_counter() - start) / calls

    return sample


def measure_trace_time(case: Case, repeats: int, notes: list[str]) -> list[Row]:
    def run(side):
        def sample() -> float:
            step = jax.jit(case.step(side))  # a new function and wrapper: nothing cached
            start = time.perf_counter()
            step.trace(*case.args())
            return time.perf_counter() - start

        return sample

    for side in ("hand", "mx"):  # warm the caches of jax's own jitted helpers
        jax.jit(case.step(side)).trace(*case.args())
    samples = interleaved({side: run(side) for side in ("hand", "mx")}, repeats)
    notes.append(
        f"(c) {case.name}: median of per-repeat ratios {paired(samples):.3f} "
        f"({repeats} fresh traces per side)."
    )
    return [ratio_row(f"(c) trace of the jitted train step, {case.name}", samples, 1.3)]


def hand_init(key: jax.Array, n: int) -> dict[str, Any]:
    kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    layers = {}
    for i, k in enumerate(jax.random.split(key, n)):
        layers[str(i)] = {
            "bias": jnp.zeros((64,), jnp.float32),
            "kernel": kernel_init(k, (64, 64), jnp.float32),
        }
    return {"params": {"layers": layers}}


def hand_init_batched(key: jax.Array, n: int) -> dict[str, Any]:
    """The kernels in one loop over their keys, split by slices: what vectorizing by hand gives."""
    kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    kernels = lax.map(lambda k: kernel_init(k, (64, 64), jnp.float32), jax.random.split(key, n))
    layers = {
        str(i): {"bias": jnp.zeros((64,), jnp.float32), "kernel": kernel}
        for i, kernel in enumerate(jnp.unstack(kernels))
    }
    return {"params": {"layers": layers}}


def measure_init(repeats: int, notes: list[str]) -> list[Row]:
    model = Stack(INIT_LAYERS)
    n_vars = 2 * INIT_LAYERS
    parts: dict[str, list[float]] = {"transform": [], "init": []}

    def ours() -> float:
        start = time.perf_counter()
        init_fn, _ = mx.transform(model)
        mid = time.perf_counter()
        jax.block_until_ready(init_fn(jax.random.key(0)))
        end = time.perf_counter()
        parts["transform"].append(mid - start)
        parts["init"].append(end - mid)
        return end - start

    def hand() -> float:
        return timed(lambda: hand_init(jax.random.key(0), INIT_LAYERS))

    hand(), ours()  # warm jax's caches for these shapes
    parts = {"transform": [], "init": []}
    samples = interleaved({"hand": hand, "mx": ours}, repeats)
    t_transform = statistics.median(parts["transform"])
    t_init = statistics.median(parts["init"])
    t_hand = statistics.median(samples["hand"])
    notes.append(
        f"(d) {INIT_LAYERS} x Dense(64, 64), {n_vars} variables: mx.transform "
        f"{fmt_time(t_transform)} ({fmt_time(t_transform / n_vars)} per variable), eager "
        f"init_fn {fmt_time(t_init)} ({fmt_time(t_init / n_vars)} per variable); hand-written "
        f"loop {fmt_time(t_hand)} ({fmt_time(t_hand / n_vars)} per variable)."
    )
    return [
        Row(f"(d) mx.transform, {INIT_LAYERS} layers", "—", fmt_time(t_transform), None, "—", None),
        Row(f"(d) init_fn (eager), {INIT_LAYERS} layers", "—", fmt_time(t_init), None, "—", None),
        ratio_row(
            f"(d) transform + init_fn vs jax.random loop, {INIT_LAYERS} layers", samples, None
        ),
    ]


def measure_init_compile(repeats: int, notes: list[str]) -> list[Row]:
    def sampler(side: str, n: int) -> Callable[[], float]:
        def sample() -> float:
            if side == "mx":
                init_fn = mx.transform(Stack(n)).init
            else:
                init_fn = partial(hand_init if side == "hand" else hand_init_batched, n=n)
            start = time.perf_counter()
            jax.jit(init_fn).lower(jax.random.key(0)).compile()  # a new wrapper: nothing cached
            return time.perf_counter() - start

        return sample

    sizes = (3, 100)
    samples = interleaved(
        {f"{side}{n}": sampler(side, n) for side in ("hand", "batched", "mx") for n in sizes},
        repeats,
    )
    rows = []
    sides = (
        ("mx", "metoryx"),
        ("hand", "hand-written loop"),
        ("batched", "hand-written lax.map + unstack"),
    )
    for side, label in sides:
        shallow, deep = (statistics.median(samples[f"{side}{n}"]) for n in sizes)
        ratio = paired(samples, f"{side}100", f"{side}3")
        target = 3.0 if side == "mx" else None
        cells = fmt_time(shallow), fmt_time(deep)
        rows.append(
            Row(
                f"(f) jit(init_fn) trace+compile, {label}: 100 vs 3 layers",
                *cells,
                deep / shallow,
                "—" if target is None else f"≤ {target:g}",
                None if target is None else ratio <= target,
                ratio,
            )
        )
    notes.append(
        "(f) columns: 3 layers | 100 layers (not hand-written | metoryx); ratio = 100 / 3 "
        f"layers, {repeats} fresh compiles per size and side; metoryx at 100 layers against "
        f"the loop at 100 layers: {paired(samples, 'mx100', 'hand100'):.3f}, against lax.map + "
        f"unstack at 100 layers: {paired(samples, 'mx100', 'batched100'):.3f}."
    )
    return rows


def measure_eager_apply(
    cases: list[tuple[Case, float, int]], repeats: int, notes: list[str]
) -> list[Row]:
    rows = []
    for case, target, calls in cases:
        hand = partial(hand_mlp, case.params, case.x)
        ours = partial(case.apply_fn, {"params": case.params}, None, case.x)
        same = bool(jnp.all(hand() == ours()[0]))
        samples = interleaved(
            {"hand": call_sampler(hand, calls), "mx": call_sampler(ours, calls)}, repeats
        )
        rows.append(ratio_row(f"(e) un-jitted apply, per call, {case.name}", samples, target))
        notes.append(
            f"(e) {case.name}: median of per-repeat ratios {paired(samples):.3f}; "
            f"outputs {'identical' if same else 'DIFFERENT'}."
        )
    return rows


def profile_eager_apply(case: Case, calls: int) -> str:
    """cProfile of the eager apply: metoryx's functions by own time, then what the layers call
    (where the JAX work they trigger goes, e.g. an extra eager dispatch per layer)."""
    variables = {"params": case.params}
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        y, _ = case.apply_fn(variables, None, case.x)
    jax.block_until_ready(y)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats("metoryx", 15)
    stats.sort_stats("cumulative").print_callees(r"metoryx/nn/.*__call__|metoryx/nn/_")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run, fewer repeats")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile metoryx's Python in the eager 100-layer apply",
    )
    opts = parser.parse_args()
    quick = opts.quick
    started = time.perf_counter()
    print(header(mx, optax))
    print(
        f"mode: {'quick' if quick else 'default'}; batch {BATCH}; ratio = metoryx / "
        f"hand-written, of medians, and paired (median of per-repeat ratios, the verdict)\n",
        flush=True,
    )

    small = mlp_case("MLP 784-512-512-10", SMALL)
    deep = mlp_case("MLP 100 x 64", DEEP)
    convnet = convnet_case()
    notes: list[str] = []
    rows: list[Row] = []

    stages = [
        ("(a)", lambda: measure_jaxprs([small, convnet], notes)),
        (
            "(b)",
            lambda: measure_step_time(
                [small, deep], 6 if quick else 30, 10 if quick else 50, notes
            ),
        ),
        ("(c)", lambda: measure_trace_time(deep, 3 if quick else 11, notes)),
        ("(d)", lambda: measure_init(2 if quick else 7, notes)),
        (
            "(e)",
            lambda: measure_eager_apply(
                [(small, 1.5, 20 if quick else 50), (deep, 1.2, 2 if quick else 5)],
                6 if quick else 30,
                notes,
            ),
        ),
        ("(f)", lambda: measure_init_compile(2 if quick else 5, notes)),
    ]
    for name, stage in stages:
        t0 = time.perf_counter()
        rows += stage()
        print(f"  {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    print(markdown(TITLES, [row.cells for row in rows]))
    print()
    for note in notes:
        print(note)
    if opts.profile:
        print("\ncProfile of the eager apply,", deep.name, "(metoryx functions only):")
        print(profile_eager_apply(deep, 20))
    failed = [row.cells[0] for row in rows if row.ok is False]
    print(
        f"\n{len(failed)} target(s) failed{': ' + '; '.join(failed) if failed else ''}. "
        f"Total time {time.perf_counter() - started:.0f} s."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
