"""Whole models: the train step of metoryx against Flax Linen, Flax NNX and Equinox.

Run from the repository root::

    python benchmarks/bench_models.py           # the recorded numbers (docs/benchmarks.md)
    python benchmarks/bench_models.py --quick   # a smoke run: 4 GPT blocks, fewer repeats
    python benchmarks/bench_models.py --models convnet resnet   # some of the models only
    python benchmarks/bench_models.py --rounds 5   # more rounds of repeats (default 3)

The models are those of ``benchmarks/_models.py``: the 12-block GPT of ``bench_deep.py``
(d_model 64, 4 heads, MLP 256, vocab 256, batch 8, sequence 32) in four layouts, unrolled or
stacked (one scan over layers: ``mx.Repeat``, Linen's ``nn.scan``, NNX's ``nnx.vmap``-built
blocks under ``nnx.scan``, Equinox's ``eqx.filter_vmap``-built blocks under ``lax.scan``), each
with or without rematerialization of every block (``mx.checkpoint`` / ``Repeat(remat=True)``,
``nn.remat``, ``nnx.remat``, ``jax.checkpoint`` / ``eqx.filter_checkpoint``); the digits
ConvNet of ``examples/train_digits.py`` (dropout 0.5 on, batch 64); and a ResNet-18-style
network (basic blocks [2, 2, 2, 2], widths 16-32-64-128, BatchNorm in training mode, 32x32x3
images, batch 16). Each library writes them with its own layers, its own idiomatic way.

The train step is the same for every side: ``value_and_grad`` of the mean softmax
cross-entropy, ``optax.adam(1e-3)``, ``optax.apply_updates``, under one plain ``jax.jit`` with
params, state and optimizer state donated, fed its own outputs. Every side starts from the
same weights (metoryx's ``init_fn``, converted to each library's layout) and the first-step
losses are checked equal (the ConvNet's with dropout off: each library draws its own masks).

Measured: the time per step at steady state, all sides of a model interleaved (each repeat
runs every side once, the order rotating), the median, and the **paired ratio** (the median of
per-repeat ratios) against the hand-written unrolled step (plain ``jnp``/``lax`` on a dict of
arrays). The repeats come in rounds (3 by default, ``--rounds``), run one after the other:
the ratios are the medians over all rounds' repeats, and the comparison with the fastest peer
also gives each round's own, so that a verdict rests on minutes of the machine's drift, not
seconds (two different programs do not slow alike when the machine does: a single round of
21 repeats put the GPT unrolled at 0.87 to 1.07x Linen from run to run). A second jit of the
hand-written step gives the noise floor: the larger of its paired ratio's distance from 1
and two standard errors of that median (from the spread of its per-repeat ratios), so that
one lucky pair cannot make it vanish. Target (issue 14): in each layout, metoryx's paired
ratio against the fastest peer in that layout is at most 1 plus the noise floor. The exit
status is 1 if a target is missed; the last line says which.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as models  # noqa: E402
from _timing import header, interleaved, markdown, median_error, paired  # noqa: E402

import metoryx as mx  # noqa: E402

LEARNING_RATE = 1e-3
OPTIMIZER = optax.adam(LEARNING_RATE)
LOSS_TOLERANCE = 1e-5  # absolute, on losses of 2.5 to 6
PEERS = {"linen": "Flax Linen", "nnx": "Flax NNX", "equinox": "Equinox"}
NAMES = {"metoryx": "metoryx", "jax": "hand-written JAX", **PEERS}
REFERENCE = "jax|unrolled"  # the side every ratio is paired against
FLOOR = "jax, second jit|unrolled"

# GPT layouts: name -> (scan, remat), and what each library calls it.
GPT_LAYOUTS = {
    "unrolled": (False, False),
    "unrolled, remat": (False, True),
    "scan": (True, False),
    "scan, remat": (True, True),
}
SPELLING = {
    "metoryx": {
        "unrolled": "list of blocks",
        "unrolled, remat": "mx.checkpoint per block",
        "scan": "mx.Repeat",
        "scan, remat": "mx.Repeat(remat=True)",
    },
    "jax": {
        "unrolled": "Python loop",
        "unrolled, remat": "jax.checkpoint per block",
        "scan": "lax.scan",
        "scan, remat": "lax.scan, jax.checkpoint body",
    },
    "linen": {
        "unrolled": "Python loop",
        "unrolled, remat": "nn.remat(Block)",
        "scan": "nn.scan",
        "scan, remat": "nn.scan(nn.remat(Block))",
    },
    "nnx": {
        "unrolled": "nnx.List",
        "unrolled, remat": "nnx.remat per block",
        "scan": "nnx.vmap + nnx.scan",
        "scan, remat": "nnx.scan(nnx.remat)",
    },
    "equinox": {
        "unrolled": "list of blocks",
        "unrolled, remat": "eqx.filter_checkpoint per block",
        "scan": "filter_vmap + lax.scan",
        "scan, remat": "lax.scan, jax.checkpoint body",
    },
}


def copy(tree: Any) -> Any:
    """Fresh buffers: every side donates its own."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def step_sampler(built: models.Built, calls: int) -> tuple[Callable[[], float], float]:
    """A sampler of the time per call of the jitted, donated train step of ``built``, fed its
    own outputs; and the loss of the first step (compiled and run here)."""
    step = jax.jit(models.make_train_step(built.forward, OPTIMIZER), donate_argnums=(0, 1, 2))
    params, state = copy(built.params), copy(built.state)
    carry = [params, state, OPTIMIZER.init(params)]
    rng, x, y = models.KEY, built.x, built.y
    params, state, opt_state, loss = step(*carry, rng, x, y)
    first_loss = float(loss)
    carry[:] = params, state, opt_state

    def sample() -> float:
        params, state, opt_state = carry
        start = time.perf_counter()
        for _ in range(calls):
            params, state, opt_state, _ = step(params, state, opt_state, rng, x, y)
        jax.block_until_ready(params)
        seconds = (time.perf_counter() - start) / calls
        carry[:] = params, state, opt_state
        return seconds

    return sample, first_loss


def sides_of(model: str, n: int) -> dict[str, tuple[models.Built, str]]:
    """``"library|layout"`` -> (the built model from the reference weights, its layout)."""
    options = {"n": n} if model == "gpt" else {}
    reference = models.reference_params(model, **options)
    layouts = GPT_LAYOUTS if model == "gpt" else {"unrolled": None}
    sides = {}
    for layout, flags in layouts.items():
        if flags is not None:
            options = {"n": n, "scan": flags[0], "remat": flags[1]}
        for library in models.LIBRARIES:
            built = models.build(model, library, reference=reference, **options)
            sides[f"{library}|{layout}"] = built, layout
    sides[FLOOR] = sides[REFERENCE]
    return sides


def check_losses(model: str, losses: dict[str, float], notes: list[str], fails: list[str]) -> None:
    """Every side's first-step loss equals the hand-written one (the ConvNet's with dropout
    off, from separate builds: each library draws its own dropout masks)."""
    if model == "convnet":
        reference = models.reference_params(model)
        losses = {
            f"{library}|unrolled": models.loss_of(
                models.build(model, library, reference=reference, dropout=0.0)
            )
            for library in models.LIBRARIES
        }
    want = losses[REFERENCE]
    worst = max(abs(loss - want) for loss in losses.values())
    ok = worst <= LOSS_TOLERANCE
    what = "dropout off" if model == "convnet" else "the timed steps' first"
    notes.append(
        f"    {model}: first-step losses ({what}), hand-written {want:.7f}; max |difference| "
        f"{worst:.1e} over {len(losses)} sides (tolerance {LOSS_TOLERANCE:g}): "
        f"{'pass' if ok else '**FAIL**'}"
    )
    if not ok:
        bad = [s for s, loss in losses.items() if abs(loss - want) > LOSS_TOLERANCE]
        fails.append(f"{model}: first-step losses differ from hand-written ({', '.join(bad)})")


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def measure(
    model: str, n: int, repeats: int, calls: int, rounds: int, notes: list[str], fails: list[str]
) -> str:
    t0 = time.perf_counter()
    sides = sides_of(model, n)
    samplers, losses = {}, {}
    for side, (built, _) in sides.items():
        samplers[side], loss = step_sampler(built, calls)
        if side != FLOOR:
            losses[side] = loss
    built_s = time.perf_counter() - t0
    check_losses(model, losses, notes, fails)
    runs = [interleaved(samplers, repeats) for _ in range(rounds)]
    samples = {side: [t for run in runs for t in run[side]] for side in sides}
    floor = paired(samples, FLOOR, REFERENCE)
    pairs = zip(samples[FLOOR], samples[REFERENCE], strict=True)
    noise = max(abs(floor - 1), median_error([f / r for f, r in pairs]))
    ratio = {side: paired(samples, side, REFERENCE) for side in sides}

    titles = ["layout", "library", "written as", "per step", "paired ratio", "vs fastest peer"]
    titles += ["target", "result"]
    rows = []
    for layout in dict.fromkeys(layout for _, layout in sides.values()):
        in_layout = [s for s, (_, lay) in sides.items() if lay == layout and s != FLOOR]
        peers = [s for s in in_layout if s.split("|")[0] in PEERS]
        fastest = min(peers, key=lambda s: ratio[s]) if peers else None
        for side in in_layout:
            library = side.split("|")[0]
            spelling = SPELLING[library][layout] if model == "gpt" else "—"
            row = [layout if model == "gpt" else "—", NAMES[library], spelling]
            row += [fmt_time(statistics.median(samples[side])), f"{ratio[side]:.3f}"]
            if library == "metoryx" and fastest is not None:
                against = paired(samples, side, fastest)
                ok = against <= 1 + noise
                each = sorted(paired(run, side, fastest) for run in runs)
                spread = f"; rounds {each[0]:.3f} to {each[-1]:.3f}" if rounds > 1 else ""
                row += [
                    f"{against:.3f} ({NAMES[fastest.split('|')[0]]}{spread})",
                    f"≤ 1 + {noise:.3f}",
                    "pass" if ok else "**FAIL**",
                ]
                if not ok:
                    fails.append(
                        f"{model} {layout}: metoryx is {against:.3f}x "
                        f"{NAMES[fastest.split('|')[0]]} (paired), target ≤ {1 + noise:.3f}"
                    )
            else:
                row += ["—", "—", "—"]
            rows.append(row)
    rows.append(
        [
            "noise floor",
            "hand-written JAX, second jit",
            "—",
            fmt_time(statistics.median(samples[FLOOR])),
            f"{floor:.3f}",
            "—",
            "—",
            "—",
        ]
    )
    notes.append(
        f"    {model}: {len(sides)} steps built, compiled and run once in {built_s:.0f} s; "
        f"{rounds} round(s) of {repeats} repeats x {calls} calls, all interleaved."
    )
    return markdown(titles, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 GPT blocks")
    parser.add_argument("--models", nargs="+", choices=models.MODELS, default=models.MODELS)
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of interleaved repeats (3; --quick: 1)"
    )
    opts = parser.parse_args()
    started = time.perf_counter()
    print(header(mx, optax, *models.PEER_MODULES))
    missing = [name for name in PEERS if name not in models.LIBRARIES]
    n = 4 if opts.quick else models.GPT_BLOCKS
    print(
        f"mode: {'quick' if opts.quick else 'default'}; optimizer adam({LEARNING_RATE:g}); "
        f"GPT {n} blocks, {models.GPT_SHAPE}; peers not installed: "
        f"{', '.join(PEERS[m] for m in missing) or 'none'}\n",
        flush=True,
    )
    repeats = (
        {"gpt": 5, "convnet": 7, "resnet": 5} if opts.quick else dict.fromkeys(models.MODELS, 11)
    )
    rounds = opts.rounds if opts.rounds is not None else 1 if opts.quick else 3
    calls = (
        {"gpt": 3, "convnet": 10, "resnet": 2}
        if opts.quick
        else {"gpt": 5, "convnet": 20, "resnet": 5}
    )
    notes: list[str] = []
    fails: list[str] = []
    tables = []
    for model in opts.models:
        t0 = time.perf_counter()
        table = measure(model, n, repeats[model], calls[model], rounds, notes, fails)
        tables.append((model, table))
        print(f"  {model} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for model, table in tables:
        print(f"{model}: time per train step, paired ratio against hand-written unrolled\n")
        print(f"{table}\n")
    for note in notes:
        print(note)
    if missing:
        names = ", ".join(PEERS[m] for m in missing)
        print(f"Peers not installed ({names}): their targets are not checked.")
    print(
        f"\n{len(fails)} target(s) failed{': ' + '; '.join(fails) if fails else ''}. "
        f"Total time {time.perf_counter() - started:.0f} s."
    )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
