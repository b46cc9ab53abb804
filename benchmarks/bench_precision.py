"""Mixed precision on the digits ConvNet of examples/train_digits.py: the jitted train step's
time in bfloat16 (mx.set_precision, float32 storage and output) against float32, and the test
accuracy each reaches in the same steps from the same seeds.

    python benchmarks/bench_precision.py [--quick]

The two steps run interleaved and the verdict is the paired ratio bf16 / f32 (``_timing.py``).
On CPU, bfloat16 has no fast units: XLA converts around each product, so the ratio shows the
cost of the casts rather than a speed-up; on a GPU or TPU the products run on half-precision
units. Exits with status 1 if bfloat16 misses the float32 accuracy by more than 1 point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import _timing  # noqa: E402
from train_digits import ConvNet, load_data, make_steps  # noqa: E402

import metoryx as mx  # noqa: E402

BATCH = 64
POLICIES = {
    "float32": None,
    "bfloat16": mx.Policy(jnp.float32, jnp.bfloat16, jnp.float32),
}


def build(policy):
    model = ConvNet() if policy is None else mx.set_precision(ConvNet(), policy)
    init_fn, apply_fn = mx.transform(model)
    return init_fn, apply_fn


def train(policy, data, steps):
    """The test accuracy after ``steps`` steps (batch 64, Adam 3e-3 cosine, seeds fixed)."""
    x_train, x_test, y_train, y_test = data
    init_fn, apply_fn = build(policy)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    train_step, accuracy = make_steps(apply_fn, optimizer)
    variables = init_fn(jax.random.key(0))
    opt_state = optimizer.init(variables["params"])
    order = np.random.default_rng(0)
    for step in range(steps):
        batch = order.choice(len(x_train), BATCH, replace=False)
        key = jax.random.fold_in(jax.random.key(1), step)
        variables, opt_state, _ = train_step(
            variables, opt_state, key, x_train[batch], y_train[batch]
        )
    return float(accuracy(variables, x_test, y_test))


def step_sampler(policy, data, calls):
    x_train, _, y_train, _ = data
    init_fn, apply_fn = build(policy)
    optimizer = optax.adam(1e-3)
    train_step, _ = make_steps(apply_fn, optimizer)
    variables = init_fn(jax.random.key(0))
    state = [variables, optimizer.init(variables["params"])]
    x, y, key = jnp.asarray(x_train[:BATCH]), jnp.asarray(y_train[:BATCH]), jax.random.key(1)
    jax.block_until_ready(train_step(*state, key, x, y))  # compile outside the timing

    def run():
        state[0], state[1], loss = train_step(*state, key, x, y)
        return loss

    return _timing.call_sampler(run, calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    args = parser.parse_args()
    repeats, calls, steps = (5, 20, 100) if args.quick else (15, 50, 300)
    data = load_data()
    print(_timing.header(mx, optax))
    samplers = {name: step_sampler(p, data, calls) for name, p in POLICIES.items()}
    samples = _timing.interleaved(samplers, repeats)
    ratio = _timing.paired(samples, "bfloat16", "float32")
    accuracies = {name: train(p, data, steps) for name, p in POLICIES.items()}
    rows = [
        [
            name,
            f"{1e3 * float(np.median(samples[name])):.2f}",
            f"{100 * accuracies[name]:.1f}%",
            "1.00" if name == "float32" else f"{ratio:.2f}",
        ]
        for name in POLICIES
    ]
    print(f"\nDigits ConvNet, batch {BATCH}, {steps} training steps for the accuracy\n")
    titles = ["compute dtype", "train step (ms)", "test accuracy", "paired ratio to float32"]
    print(_timing.markdown(titles, rows))
    gap = accuracies["float32"] - accuracies["bfloat16"]
    points = 100 * (accuracies["bfloat16"] - accuracies["float32"])
    print(f"\nbfloat16 - float32 accuracy: {points:+.1f} points (target: within 1)")
    return 0 if gap <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
