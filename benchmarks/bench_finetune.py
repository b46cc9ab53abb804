"""Fine-tuning against hand-written JAX: a train step with a frozen half, and the tools' times.

Run from the repository root::

    python benchmarks/bench_finetune.py           # the recorded numbers (docs/benchmarks.md)
    python benchmarks/bench_finetune.py --quick   # a fast smoke run, fewer repeats

Frozen step: an MLP of 8 ``Dense(256, 256)`` layers at batch 64 whose first 4 layers are
frozen with ``mx.freeze``. The metoryx step splits ``variables`` with
``mx.partition(variables, mx.filters.trainable, info)``, differentiates the trainable part
only and runs ``optax.adamw`` on it; the hand-written step does the same with two dicts of
arrays it keeps apart itself (the trainable layers and the frozen ones). Compared: the jaxpr
equations of the jitted steps (the same program: equal counts) and their per-call times, both
sides interleaved in one run; "paired" is the median of per-repeat ratios, the verdict.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _timing import call_sampler, header, interleaved, markdown, paired, walk_eqns  # noqa: E402
from bench_deep import GPT, SMALL  # noqa: E402  (the deep-models benchmark's GPT, for mx.lora)

import metoryx as mx  # noqa: E402

WIDTH, LAYERS, FROZEN, BATCH = 256, 8, 4, 64


class MLP(mx.Module):
    """``LAYERS`` Dense(WIDTH, WIDTH) layers with ReLU between them."""

    def __init__(self) -> None:
        self.layers = [mx.Dense(WIDTH, WIDTH) for _ in range(LAYERS)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = mx.relu(layer(x))
        return self.layers[-1](x)


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def frozen_steps(optimizer: optax.GradientTransformation) -> tuple[Any, Any, tuple, tuple]:
    """The metoryx and the hand-written step, and the arguments of each."""
    model = MLP()
    mx.freeze(model.layers[:FROZEN])
    transformed = mx.transform(model)
    info = mx.variable_info(transformed)
    variables = transformed.init(jax.random.key(0))
    trainable, frozen = mx.partition(variables, mx.filters.trainable, info)

    def mx_step(trainable, frozen, opt_state, x, labels):
        def loss_fn(trainable):
            logits, _ = transformed.apply(mx.combine(trainable, frozen), None, x)
            return _loss(logits, labels)

        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    # The hand-written side: the same arrays, kept as two dicts of layers by the user.
    hand_train = {i: trainable["params"]["layers"][str(i)] for i in range(FROZEN, LAYERS)}
    hand_frozen = {i: frozen["params"]["layers"][str(i)] for i in range(FROZEN)}

    def hand_step(train, fixed, opt_state, x, labels):
        def loss_fn(train):
            layers = {**fixed, **train}
            h = x
            for i in range(LAYERS):
                h = h @ layers[i]["kernel"] + layers[i]["bias"]
                if i < LAYERS - 1:
                    h = jax.nn.relu(h)
            return _loss(h, labels)

        grads = jax.grad(loss_fn)(train)
        updates, opt_state = optimizer.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state

    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (BATCH, WIDTH))
    labels = jax.random.randint(ky, (BATCH,), 0, WIDTH)
    mx_args = (trainable, frozen, optimizer.init(trainable), x, labels)
    hand_args = (hand_train, hand_frozen, optimizer.init(hand_train), x, labels)
    return mx_step, hand_step, mx_args, hand_args


def measure_frozen_step(repeats: int, calls: int) -> list[list[str]]:
    optimizer = optax.adamw(1e-3, weight_decay=0.01)
    mx_step, hand_step, mx_args, hand_args = frozen_steps(optimizer)
    rows = []
    counts = {
        side: sum(1 for _ in walk_eqns(jax.make_jaxpr(step)(*args).jaxpr))
        for side, step, args in (("mx", mx_step, mx_args), ("hand", hand_step, hand_args))
    }
    rows.append(
        ["frozen-half step: jaxpr equations", str(counts["hand"]), str(counts["mx"]), "", ""]
    )
    jitted = {"mx": jax.jit(mx_step), "hand": jax.jit(hand_step)}
    args = {"mx": mx_args, "hand": hand_args}
    for side in jitted:
        jax.block_until_ready(jitted[side](*args[side]))  # compile outside the timing

    samples = interleaved(
        {s: call_sampler(lambda s=s: jitted[s](*args[s]), calls) for s in jitted}, repeats
    )
    mx_median = sorted(samples["mx"])[len(samples["mx"]) // 2]
    hand_median = sorted(samples["hand"])[len(samples["hand"]) // 2]
    rows.append(
        [
            "frozen-half step: time per call",
            f"{hand_median * 1e6:.0f} µs",
            f"{mx_median * 1e6:.0f} µs",
            f"{mx_median / hand_median:.3f}",
            f"{paired(samples):.3f}",
        ]
    )
    # Nothing of the frozen half is optimized: the state holds the trainable arrays only.
    state_sizes = sum(a.size for a in jax.tree.leaves(mx_args[2]))
    trainable_sizes = sum(a.size for a in jax.tree.leaves(mx_args[0]))
    rows.append(
        [
            "adamw state elements / trainable elements",
            "",
            f"{state_sizes:,} / {trainable_sizes:,}",
            "",
            "",
        ]
    )
    return rows


TITLES = ["measure", "hand-written", "metoryx", "ratio", "paired"]

LORA_BLOCKS, LORA_RANK = 48, 8


def measure_lora(repeats: int) -> list[list[str]]:
    """Median times of ``mx.lora`` (every Dense and Embed of the GPT of bench_deep.py,
    ``LORA_BLOCKS`` blocks, rank ``LORA_RANK``) and of ``mx.merge_lora`` on its variables, per
    layout of the blocks: a list of blocks (``unrolled``) or one ``mx.Repeat``."""
    rows = []
    for layout in ("unrolled", "repeat"):
        model = GPT(SMALL, LORA_BLOCKS, layout)
        adapted = mx.lora(model, LORA_RANK)
        variables = jax.block_until_ready(mx.init(adapted)(jax.random.key(0)))
        adapters = sum(1 for _ in mx.modules(adapted, mx.LoRA))
        times: dict[str, list[float]] = {"lora": [], "merge": []}
        for _ in range(repeats):
            start = time.perf_counter()
            mx.lora(model, LORA_RANK)
            times["lora"].append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(mx.merge_lora(adapted, variables)[1])
            times["merge"].append(time.perf_counter() - start)
        lora_s, merge_s = (sorted(t)[len(t) // 2] for t in times.values())
        rows.append([layout, str(adapters), f"{lora_s * 1e3:.1f} ms", f"{merge_s * 1e3:.1f} ms"])
    return rows


LORA_TITLES = ["GPT layout", "adapted layers", "mx.lora", "mx.merge_lora"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run, fewer repeats")
    quick = parser.parse_args().quick
    started = time.perf_counter()
    print(header(mx, optax))
    print(
        f"frozen step: MLP {LAYERS} x Dense({WIDTH}, {WIDTH}), first {FROZEN} frozen, batch "
        f"{BATCH}, adamw; ratio = metoryx / hand-written\n"
    )
    with jax.numpy_dtype_promotion("standard"):
        rows = measure_frozen_step(5 if quick else 31, 10 if quick else 50)
    print(markdown(TITLES, rows))
    print(
        f"\nLoRA: the GPT of bench_deep.py ({SMALL}), {LORA_BLOCKS} blocks, rank {LORA_RANK} on "
        f"every Dense and Embed; median of {3 if quick else 11} runs (merge: eager, on CPU)\n"
    )
    print(markdown(LORA_TITLES, measure_lora(3 if quick else 11)))
    print(f"\nTotal time {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
