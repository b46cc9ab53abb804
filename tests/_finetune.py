"""What the fine-tuning proofs share (tests/test_tagging.py, tests/test_lora.py): the digits
ConvNet of the example, Adam on one part of the variables, and test accuracy."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metoryx as mx

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_digits.py"


def digits_example():
    """examples/train_digits.py as a module: its ConvNet and load_data."""
    spec = importlib.util.spec_from_file_location("train_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit(apply_fn, trainable, rest, images, labels, optimizer, steps, key):
    """``steps`` optimizer steps on ``trainable`` only, batches of 64: ``rest`` is a constant
    of the step, so jax.grad never sees it. Returns the trained part and the optimizer state."""

    @jax.jit
    def step(trainable, rest, state, x, y, key):
        def loss_fn(trainable):
            logits, _ = apply_fn(mx.combine(trainable, rest), key, x, is_training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, state = optimizer.update(jax.grad(loss_fn)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count and floats
        state = optimizer.init(trainable)
        rng = np.random.default_rng(0)
        for i in range(steps):
            batch = rng.choice(len(images), 64, replace=False)
            trainable, state = step(
                trainable, rest, state, images[batch], labels[batch], jax.random.fold_in(key, i)
            )
    return trainable, state


def accuracy(apply_fn, variables, images, labels):
    """Test accuracy and the logits it came from."""
    logits, _ = jax.jit(apply_fn)(variables, None, images)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels)), logits
