"""Deep models: what ``mx.Repeat`` buys over an unrolled stack of blocks, and what it costs.

Run from the repository root::

    python benchmarks/bench_deep.py           # the recorded numbers (docs/benchmarks.md)
    python benchmarks/bench_deep.py --quick   # a smoke run: fewer depths and repeats

The model is a small GPT: token embedding plus a learned positional embedding, ``N`` pre-
LayerNorm blocks (causal multi-head self-attention, then a 4x GELU MLP, each with a residual),
a final LayerNorm and a Dense head to the vocabulary. The train step is ``value_and_grad`` of
the mean softmax cross-entropy of the next tokens, an ``optax.adam`` update and
``optax.apply_updates``, the whole step under one ``jax.jit``. The blocks are written twice:
unrolled (``self.blocks = [Block() for _ in range(N)]``, a Python loop: the program holds
``N`` copies of the block) and stacked (``mx.Repeat(Block, N)``: one ``lax.scan`` whose body is
the block). Measured:

(a) compile: wall time of ``jax.jit(step).trace(...).lower().compile()`` for N = 2, 12, 24
    and 48, each sample with a new step function and a new ``jax.jit`` wrapper, so nothing is
    cached; the verdict is Repeat(48) / Repeat(2), the median of per-repeat ratios (target
    1.5). The unrolled ratio is what the stacking saves.
(b) memory: XLA's ``compiled.memory_analysis()`` of the 24-block step at batch 32 and
    sequence 128 (activations dominate), with and without rematerialization: ``mx.Repeat(...,
    remat=True)``, and unrolled blocks each wrapped in ``mx.checkpoint`` (and, by hand, in
    ``jax.checkpoint``). Params and optimizer state are donated, as in a training loop, so
    outputs alias them.
(c) step time: the jitted train step of the 12-block model at steady state, Repeat against
    unrolled (same weights), repeats interleaved; a second jit of the Repeat step gives the
    noise floor (target: paired ratio 1.1).
(d) checks: both layouts compute the same numbers. ``mx.unstack`` of the Repeat model's
    variables must equal the unrolled model's ``init_fn`` from the same key (by design), and
    the losses and gradients of the two layouts (and of ``remat=True``) must agree.

A hand-written ``lax.scan`` over the metoryx Block's ``apply_fn`` (on the Repeat model's
variables) joins (b), (c) and (d): it is the program ``mx.Repeat`` should be, so it separates
what metoryx costs from what a scan costs.

Peers, where installed (columns left out otherwise): Flax Linen ``nn.scan`` over a block
(``variable_axes={"params": 0}``; ``nn.remat`` inside for the memory row) and Equinox's
scan-over-layers (``eqx.filter_vmap`` builds the stacked blocks, ``lax.scan`` applies them over
``eqx.partition``'s arrays; ``jax.checkpoint`` of the scan body for the memory row), same sizes,
same train step and optimizer, under plain ``jax.jit``. They use their own layers (Linen's and
Equinox's attention write the softmax out; metoryx calls ``jax.nn.dot_product_attention``).

The exit status is 1 if a target is missed; the last line says which.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from _models import GPT, Block, Shape, eqx, flax, nn  # noqa: E402
from _timing import header, interleaved, markdown, paired, walk_eqns  # noqa: E402

import metoryx as mx  # noqa: E402

if nn is not None:
    from _models import LinenGPT  # noqa: E402
if eqx is not None:
    from _models import EqxGPT  # noqa: E402

LEARNING_RATE = 1e-3
OPTIMIZER = optax.adam(LEARNING_RATE)
KEY = jax.random.key(0)
COMPILE_TARGET = 1.5  # Repeat(48) / Repeat(2), compile
STEP_TARGET = 1.1  # Repeat / unrolled, per step
REMAT_TARGET = 0.5  # temp memory of Repeat(remat=True) / Repeat
LOSS_TOLERANCE = 1e-5  # absolute, on a loss of ~6
GRAD_TOLERANCE = 1e-4  # max |difference| / max |gradient|
REMAT_PRIMITIVES = ("remat2", "checkpoint", "remat")  # its name differs between JAX versions
SLOW_S = 180.0  # a compile slower than this is measured once, not in every repeat


SMALL = Shape(d_model=64, heads=4, batch=8, seq=32)  # compile time, step time, checks
LARGE = Shape(d_model=64, heads=4, batch=32, seq=128)  # memory: activations dominate


def _is_param(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(
        x.dtype, jnp.floating
    )


# ---------------------------------------------------------------------------------------------
# Programs: a forward function, its parameters (arrays, or shapes only) and the train step.

Forward = Callable[[Any, jax.Array], jax.Array]  # (params, ids) -> logits


def make_step(forward: Forward) -> Callable[..., Any]:
    """A new train step function (a fresh object each call, so a new jit caches nothing)."""

    def train_step(params, opt_state, tokens):
        def loss_fn(p):
            logits = forward(p, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def tokens_of(shape: Shape) -> jax.Array:
    """A batch of ``seq + 1`` token ids: inputs ``[:, :-1]``, next-token targets ``[:, 1:]``."""
    return jax.random.randint(jax.random.key(42), (shape.batch, shape.seq + 1), 0, shape.vocab)


@dataclasses.dataclass
class Program:
    forward: Forward
    params: Any
    tokens: Any
    opt_state: Any = None

    def __post_init__(self):
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params))
        init = partial(jax.eval_shape, OPTIMIZER.init) if abstract else OPTIMIZER.init
        self.opt_state = init(self.params)

    def args(self) -> tuple:
        return self.params, self.opt_state, self.tokens


def mx_program(layout: str, n: int, shape: Shape, concrete: bool, params: Any = None) -> Program:
    init_fn, apply_fn = mx.transform(GPT(shape, n, layout))
    if params is None:
        params = (init_fn if concrete else partial(jax.eval_shape, init_fn))(KEY)["params"]

    def forward(p, ids):
        return apply_fn({"params": p}, None, ids)[0]

    return Program(forward, params, _tokens(shape, concrete))


def hand_program(kind: str, n: int, shape: Shape, concrete: bool, params: Any = None) -> Program:
    """The blocks applied by hand, each through the metoryx Block's ``apply_fn``: ``"scan"``
    is a ``lax.scan`` over the Repeat model's stacked variables (the program ``mx.Repeat``
    should be); ``"checkpoint"`` is a Python loop over the unrolled model's variables with each
    block under ``jax.checkpoint`` (what ``mx.checkpoint`` per block should be)."""
    d = shape.d_model
    if params is None:
        init_fn = mx.init(GPT(shape, n, "repeat" if kind == "scan" else "unrolled"))
        params = (init_fn if concrete else partial(jax.eval_shape, init_fn))(KEY)["params"]
    tokens, positions = mx.apply(mx.Embed(shape.vocab, d)), mx.apply(mx.Embed(shape.seq, d))
    block, ln_f = mx.apply(Block(d, shape.heads)), mx.apply(mx.LayerNorm(d))
    head = mx.apply(mx.Dense(d, shape.vocab))

    def apply_block(block_params, x):
        return block({"params": block_params}, None, x)[0]

    def forward(p, ids):
        x = tokens({"params": p["tokens"]}, None, ids)[0]
        x = x + positions({"params": p["positions"]}, None, jnp.arange(ids.shape[-1]))[0]
        if kind == "scan":
            x, _ = lax.scan(lambda x, bp: (apply_block(bp, x), None), x, p["blocks"])
        else:
            for i in range(n):
                x = jax.checkpoint(apply_block)(p["blocks"][str(i)], x)
        x = ln_f({"params": p["ln_f"]}, None, x)[0]
        return head({"params": p["head"]}, None, x)[0]

    return Program(forward, params, _tokens(shape, concrete))


scan_program = partial(hand_program, "scan")


def linen_program(remat: bool, n: int, shape: Shape, concrete: bool) -> Program:
    model = LinenGPT(shape, n, remat)
    ids = jax.ShapeDtypeStruct((shape.batch, shape.seq), jnp.int32)
    init = jax.jit(model.init) if concrete else partial(jax.eval_shape, model.init)
    params = init(KEY, jnp.zeros(ids.shape, ids.dtype) if concrete else ids)["params"]

    def forward(p, ids):
        return model.apply({"params": p}, ids)

    return Program(forward, params, _tokens(shape, concrete))


def equinox_program(remat: bool, n: int, shape: Shape, concrete: bool) -> Program:
    make = partial(EqxGPT, shape, n, remat, key=KEY)
    model = make() if concrete else eqx.filter_eval_shape(make)
    params, static = eqx.partition(model, _is_param)

    def forward(p, ids):
        return jax.vmap(eqx.combine(p, static))(ids)

    return Program(forward, params, _tokens(shape, concrete))


def _tokens(shape: Shape, concrete: bool) -> Any:
    if concrete:
        return tokens_of(shape)
    return jax.ShapeDtypeStruct((shape.batch, shape.seq + 1), jnp.int32)


# The sides of the compile and step-time tables: name -> (n, shape, concrete) -> Program.
Builder = Callable[[int, Shape, bool], Program]
SIDES: dict[str, Builder] = {
    "metoryx unrolled": partial(mx_program, "unrolled"),
    "metoryx Repeat": partial(mx_program, "repeat"),
}
if nn is not None:
    SIDES["Flax Linen nn.scan"] = partial(linen_program, False)
if eqx is not None:
    SIDES["Equinox scan"] = partial(equinox_program, False)

# The rows of the memory table.
MEMORY_SIDES: dict[str, Builder] = {
    "metoryx unrolled": partial(mx_program, "unrolled"),
    "metoryx unrolled, mx.checkpoint per block": partial(mx_program, "checkpointed"),
    "hand-written unrolled, jax.checkpoint per block": partial(hand_program, "checkpoint"),
    "metoryx Repeat": partial(mx_program, "repeat"),
    "metoryx Repeat(remat=True)": partial(mx_program, "repeat remat"),
    "hand-written lax.scan over the metoryx Block": scan_program,
}
if nn is not None:
    MEMORY_SIDES["Flax Linen nn.scan"] = partial(linen_program, False)
    MEMORY_SIDES["Flax Linen nn.scan(nn.remat(Block))"] = partial(linen_program, True)
if eqx is not None:
    MEMORY_SIDES["Equinox scan"] = partial(equinox_program, False)
    MEMORY_SIDES["Equinox scan, jax.checkpoint(body)"] = partial(equinox_program, True)


# ---------------------------------------------------------------------------------------------
# Helpers.


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN: not measured
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.2f} ms"


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def verdict(ok: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "—"}[ok]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def paired_or_nan(samples: dict[str, list[float]], ours: str, theirs: str) -> float:
    pairs = {ours: [], theirs: []}
    for o, t in zip(samples[ours], samples[theirs], strict=True):
        if o == o and t == t:
            pairs[ours].append(o)
            pairs[theirs].append(t)
    return paired(pairs, ours, theirs) if pairs[ours] else float("nan")


def compile_program(program: Program, **jit_options: Any) -> tuple[dict[str, float], Any, Any]:
    """Trace, lower and compile a new jit of a new step function: the wall time of each, the
    compiled program and the jaxpr."""
    step = jax.jit(make_step(program.forward), **jit_options)
    t0 = time.perf_counter()
    traced = step.trace(*program.args())
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2}, compiled, traced.jaxpr


# ---------------------------------------------------------------------------------------------
# The measures.


def measure_compile(
    sides: dict[str, Builder],
    depths: tuple[int, ...],
    max_unrolled: int,
    repeats: int,
    notes: list[str],
    fails: list[str],
) -> str:
    cells = {
        (side, n): build(n, SMALL, False)
        for side, build in sides.items()
        for n in depths
        if side != "metoryx unrolled" or n <= max_unrolled
    }
    parts: dict[tuple[str, int], list[dict[str, float]]] = {key: [] for key in cells}
    slow: dict[tuple[str, int], bool] = {}

    def sampler(key: tuple[str, int]) -> Callable[[], float]:
        def sample() -> float:
            if slow.get(key):
                return float("nan")
            times, _, _ = compile_program(cells[key])
            parts[key].append(times)
            total = sum(times.values())
            slow[key] = total > SLOW_S
            return total

        return sample

    # Warm the caches of JAX's own jitted helpers (jnp, jax.nn, optax) and XLA's start-up.
    if repeats > 1:
        compile_program(sides["metoryx Repeat"](depths[0], SMALL, False))
    for build in sides.values():
        program = build(depths[0], SMALL, False)
        jax.jit(make_step(program.forward)).trace(*program.args())
    samples = interleaved({f"{s}|{n}": sampler((s, n)) for s, n in cells}, repeats)

    def cell(side: str, n: int) -> list[float]:
        return samples.get(f"{side}|{n}", [])

    titles = ["blocks", *sides]
    titles += [
        f"{side.split(' ', 1)[-1] if 'metoryx' in side else side} (N) / (2)" for side in sides
    ]
    titles += ["target", "result"]
    rows = []
    base = depths[0]
    for n in depths:
        row = [str(n)]
        row += [fmt_time(median(cell(side, n))) for side in sides]
        for side in sides:
            if not cell(side, n) or not cell(side, base):
                row.append("—")
                continue
            ratio = paired_or_nan({"n": cell(side, n), "base": cell(side, base)}, "n", "base")
            row.append(f"{ratio:.2f}")
        if n == depths[-1] and n != base:
            ratio = paired_or_nan(
                {"n": cell("metoryx Repeat", n), "base": cell("metoryx Repeat", base)}, "n", "base"
            )
            ok = ratio <= COMPILE_TARGET
            row += [f"Repeat ≤ {COMPILE_TARGET:g}", verdict(ok)]
            if not ok:
                fails.append(
                    f"(a) compile of Repeat({n}) is {ratio:.2f}x Repeat({base}), "
                    f"target ≤ {COMPILE_TARGET:g}"
                )
        else:
            row += ["—", "—"]
        rows.append(row)

    notes.append(
        f"(a) {SMALL}; seconds of trace + lower + compile, median of {repeats} fresh jits per "
        f"cell, all cells interleaved; (N) / (2) is the median of per-repeat ratios. "
        f"Breakdown (median trace / lower / compile):"
    )
    for (side, n), times in parts.items():
        if not times:
            continue
        split = " / ".join(
            fmt_time(statistics.median(t[k] for t in times)) for k in ("trace", "lower", "compile")
        )
        once = (
            f" (measured once: over {SLOW_S:.0f} s)" if slow.get((side, n)) and repeats > 1 else ""
        )
        notes.append(f"    {side}, {n} blocks: {split}{once}")
    if max_unrolled < depths[-1] or len(sides) < len(SIDES):
        notes.append(
            f"    --quick: metoryx unrolled measured up to {max_unrolled} blocks only; peers in "
            f"(c) only."
        )
    return markdown(titles, rows)


def memory_stats(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    keys = ("argument", "output", "alias", "temp")
    out = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in keys}
    return out


def measure_memory(n: int, sides: dict[str, Builder], notes: list[str], fails: list[str]) -> str:
    results = {}
    params_bytes = {}
    remats = {}  # jax.checkpoint equations in the jaxpr: the request XLA gets
    for side, build in sides.items():
        program = build(n, LARGE, False)
        params_bytes[side] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(program.params))
        times, compiled, jaxpr = compile_program(program, donate_argnums=(0, 1))
        results[side] = (memory_stats(compiled), sum(times.values()))
        remats[side] = sum(e.primitive.name in REMAT_PRIMITIVES for e in walk_eqns(jaxpr.jaxpr))
        del compiled
    titles = [
        "variant",
        "params",
        "temp",
        "args + outputs + temp − aliases",
        "temp / Repeat",
        "compile",
        "target",
        "result",
    ]
    reference = results.get("metoryx Repeat", next(iter(results.values())))[0]["temp"]
    rows = []
    for side, (stats, seconds) in results.items():
        total = stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]
        row = [
            side,
            fmt_mb(params_bytes[side]),
            fmt_mb(stats["temp"]),
            fmt_mb(total),
            f"{stats['temp'] / reference:.3f}",
            fmt_time(seconds),
        ]
        if side == "metoryx Repeat(remat=True)":
            ratio = stats["temp"] / reference
            ok = ratio <= REMAT_TARGET
            row += [f"≤ {REMAT_TARGET:g}", verdict(ok)]
            if not ok:
                fails.append(
                    f"(b) Repeat(remat=True) temp memory is {ratio:.3f}x Repeat's, "
                    f"target ≤ {REMAT_TARGET:g}"
                )
        else:
            row += ["—", "—"]
        rows.append(row)
    notes.append(
        f"(b) {n} blocks, {LARGE}; from compiled.memory_analysis() of the jitted train step, "
        f"params and optimizer state donated. Raw bytes (argument / output / alias / temp), and "
        f"the jax.checkpoint equations of the step's jaxpr:"
    )
    for side, (stats, _) in results.items():
        raw = [stats[k] for k in ("argument", "output", "alias", "temp")]
        notes.append(f"    {side}: {' / '.join(f'{b:,}' for b in raw)}; {remats[side]} checkpoint")
    return markdown(titles, rows)


def step_sampler(step: Callable[..., Any], program: Program, calls: int) -> Callable[[], float]:
    """A sampler of the time per call of a jitted train step, fed its own outputs."""
    state = list(program.args())

    def sample() -> float:
        params, opt_state, tokens = state
        start = time.perf_counter()
        for _ in range(calls):
            params, opt_state, loss = step(params, opt_state, tokens)
        jax.block_until_ready((params, loss))
        seconds = (time.perf_counter() - start) / calls
        state[:2] = params, opt_state
        return seconds

    return sample


def measure_step(
    n: int, repeats: int, calls: int, quick: bool, notes: list[str], fails: list[str]
) -> str:
    repeat = mx_program("repeat", n, SMALL, True)
    # The unrolled model starts from the same weights, converted to its layout.
    unrolled_params = mx.unstack(GPT(SMALL, n, "repeat"), {"params": repeat.params})["params"]
    programs = {
        "metoryx unrolled": mx_program("unrolled", n, SMALL, True, unrolled_params),
        "metoryx Repeat": repeat,
    }
    if not quick:
        programs["metoryx Repeat, second jit"] = repeat
        programs["hand-written lax.scan over the metoryx Block"] = scan_program(
            n, SMALL, True, repeat.params
        )
    if nn is not None:
        programs["Flax Linen nn.scan"] = linen_program(False, n, SMALL, True)
    if eqx is not None:
        programs["Equinox scan"] = equinox_program(False, n, SMALL, True)
    steps = {side: jax.jit(make_step(p.forward)) for side, p in programs.items()}
    for side, step in steps.items():  # compile, and warm up
        jax.block_until_ready(step(*programs[side].args()))
    samplers = {side: step_sampler(steps[side], programs[side], calls) for side in steps}
    samples = interleaved(samplers, repeats)

    titles = ["side", "per step", "ratio", "paired", "against", "target", "result"]
    ref = "metoryx unrolled"
    rows = []
    for side in programs:
        against = "metoryx Repeat" if side == "metoryx Repeat, second jit" else ref
        t = median(samples[side])
        if side == ref:
            rows.append([side, fmt_time(t), "1.000", "—", "—", "—", "—"])
            continue
        ratio = t / median(samples[against])
        pair = paired(samples, side, against)
        ok = None
        if side == "metoryx Repeat":
            ok = pair <= STEP_TARGET
            if not ok:
                fails.append(
                    f"(c) step time of Repeat is {pair:.3f}x unrolled (paired), "
                    f"target ≤ {STEP_TARGET:g}"
                )
        target = f"≤ {STEP_TARGET:g}" if side == "metoryx Repeat" else "—"
        label = "noise floor: Repeat against itself" if "second" in side else side
        rows.append(
            [label, fmt_time(t), f"{ratio:.3f}", f"{pair:.3f}", against, target, verdict(ok)]
        )
    notes.append(
        f"(c) {n} blocks, {SMALL}; {repeats} repeats x {calls} calls, all sides interleaved; "
        f"ratio of medians and median of per-repeat ratios (paired)."
    )
    return markdown(titles, rows)


def check_same_numbers(n: int, quick: bool, notes: list[str], fails: list[str]) -> None:
    """The unrolled model from the Repeat model's weights (``mx.unstack``), ``remat=True`` and
    the hand-written scan must compute the Repeat model's loss and gradients."""
    repeat, unrolled = GPT(SMALL, n, "repeat"), GPT(SMALL, n, "unrolled")
    variables = mx.init(repeat)(KEY)
    unstacked = mx.unstack(repeat, variables)

    def equal(a: Any, b: Any) -> bool:
        return jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))

    same_init = equal(unstacked, mx.init(unrolled)(KEY))
    round_trip = equal(mx.stack(repeat, unstacked), variables)
    stacked, unrolled_params = variables["params"], unstacked["params"]
    # name -> (forward, its params, its gradients in the stacked layout)
    cases: dict[str, tuple[Forward, Any, Callable[[Any], Any]]] = {
        "Repeat": (mx_program("repeat", n, SMALL, True, stacked).forward, stacked, lambda g: g),
        "unrolled": (
            mx_program("unrolled", n, SMALL, True, unrolled_params).forward,
            unrolled_params,
            lambda g: mx.stack(repeat, {"params": g})["params"],
        ),
    }
    if not quick:
        remat = mx_program("repeat remat", n, SMALL, True, stacked)
        cases["Repeat(remat=True)"] = (remat.forward, stacked, lambda g: g)
        cases["hand-written lax.scan"] = (
            scan_program(n, SMALL, True, stacked).forward,
            stacked,
            lambda g: g,
        )
    tokens = tokens_of(SMALL)
    results = {}
    for name, (forward, params, to_stacked) in cases.items():

        def loss_fn(p, forward=forward):
            logits = forward(p, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        results[name] = float(loss), to_stacked(grads)

    reference_loss, reference_grads = results["Repeat"]
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reference_grads))
    diffs = {}
    for name, (loss, grads) in results.items():
        grad_diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True)
        )
        diffs[name] = abs(loss - reference_loss), grad_diff / scale
    ok = (
        same_init
        and round_trip
        and all(d[0] <= LOSS_TOLERANCE and d[1] <= GRAD_TOLERANCE for d in diffs.values())
    )
    notes.append(
        f"(d) {n} blocks, {SMALL}: mx.unstack(Repeat init) == unrolled init from the same key: "
        f"{'yes' if same_init else 'NO'}; mx.stack(mx.unstack(v)) == v: "
        f"{'yes' if round_trip else 'NO'}. From the Repeat model's weights (unstacked for the "
        f"unrolled model), loss; |loss difference| and max |gradient difference| / max "
        f"|gradient| to Repeat (tolerances {LOSS_TOLERANCE:g}, {GRAD_TOLERANCE:g}):"
    )
    for name, (loss, _) in results.items():
        notes.append(f"    {name}: {loss:.7f}; {diffs[name][0]:.2e}, {diffs[name][1]:.2e}")
    notes.append(f"    same numbers: {'pass' if ok else '**FAIL**'}")
    if not ok:
        fails.append("(d) the unrolled and Repeat models do not compute the same numbers")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, fewer depths/repeats")
    opts = parser.parse_args()
    quick = opts.quick
    # A persistent compilation cache would turn compiles into cache reads.
    jax.config.update("jax_enable_compilation_cache", False)
    started = time.perf_counter()
    peers = [m for m in (flax, eqx) if m is not None]
    print(header(mx, optax, *peers))
    missing = [name for name, m in (("flax", flax), ("equinox", eqx)) if m is None]
    print(
        f"mode: {'quick' if quick else 'default'}; optimizer adam({LEARNING_RATE:g}); "
        f"peers not installed: {', '.join(missing) or 'none'}\n",
        flush=True,
    )
    # --quick: Repeat's compile target at 2 and 48 blocks, unrolled at 2, peers in (c) only.
    depths = (2, 48) if quick else (2, 12, 24, 48)
    compile_sides = {k: v for k, v in SIDES.items() if "metoryx" in k} if quick else SIDES
    memory_sides = (
        {k: v for k, v in MEMORY_SIDES.items() if "Repeat" in k} if quick else MEMORY_SIDES
    )
    step_blocks = 12
    notes: list[str] = []
    fails: list[str] = []
    tables: list[tuple[str, str]] = []

    def compile_stage() -> str:
        repeats = 1 if quick else 3
        max_unrolled = 2 if quick else depths[-1]
        return measure_compile(compile_sides, depths, max_unrolled, repeats, notes, fails)

    def step_stage() -> str:
        repeats, calls = (5, 3) if quick else (21, 5)
        return measure_step(step_blocks, repeats, calls, quick, notes, fails)

    stages = [
        ("(a) compile time of the jitted train step", compile_stage),
        (
            "(b) compiled memory of the 24-block train step",
            lambda: measure_memory(24, memory_sides, notes, fails),
        ),
        (f"(c) time per train step, {step_blocks} blocks", step_stage),
        ("(d) checks", lambda: check_same_numbers(step_blocks, quick, notes, fails) or ""),
    ]
    for title, stage in stages:
        t0 = time.perf_counter()
        table = stage()
        elapsed = time.perf_counter() - t0
        print(f"  {title[:3]} done in {elapsed:.1f} s", file=sys.stderr, flush=True)
        if table:
            tables.append((title, table))

    for title, table in tables:
        print(f"{title}\n\n{table}\n")
    for note in notes:
        print(note)
    print(
        f"\n{len(fails)} target(s) failed{': ' + '; '.join(fails) if fails else ''}. "
        f"Total time {time.perf_counter() - started:.0f} s."
    )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
