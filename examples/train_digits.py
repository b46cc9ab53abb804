"""Train a small ConvNet on scikit-learn's handwritten digits, end to end.

The model is defined the PyTorch way, as a ``mx.Module`` with layers as attributes, and run the
JAX way: ``mx.transform`` turns it into two pure functions, ``init_fn(key) -> variables`` and
``apply_fn(variables, rngs, x, ...) -> (logits, new_variables)``, and from there on it is plain
JAX and optax: ``jax.jit``, ``jax.value_and_grad`` over ``variables["params"]``, ``optax.adam``.

The data set is the 1,797 8x8 grayscale digits bundled with scikit-learn (no download), split
80/20 into train and test, stratified by class. Runs in well under a minute on a laptop CPU.

    python examples/train_digits.py --out out/digits

writes to ``--out``: ``curves.png`` (training loss and test accuracy per epoch),
``metrics.json`` (the final test accuracy, the per-epoch history and the settings) and
``variables.npz`` (the trained variables, keyed by path such as ``params/conv1/kernel``).
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import metoryx as mx

matplotlib.use("Agg")  # write PNGs without a display
import matplotlib.pyplot as plt  # noqa: E402


class ConvNet(mx.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = mx.Conv(1, 32, kernel_size=(3, 3), strides=(1, 1), padding="SAME")
        self.conv2 = mx.Conv(32, 64, kernel_size=(3, 3), strides=(1, 1), padding="SAME")
        self.fc1 = mx.Dense(2 * 2 * 64, 128)  # 8x8 input, pooled twice: 2x2x64
        self.fc2 = mx.Dense(128, 10)

    def __call__(self, x, is_training=False):
        x = mx.max_pool(mx.relu(self.conv1(x)), kernel_size=(2, 2), strides=(2, 2))
        x = mx.max_pool(mx.relu(self.conv2(x)), kernel_size=(2, 2), strides=(2, 2))
        x = mx.dropout(x.reshape((x.shape[0], -1)), rate=0.5, is_training=is_training)
        return self.fc2(mx.relu(self.fc1(x)))


def load_data():
    """Digits as NHWC float32 images in [0, 1] and int32 labels, split 80/20 by class."""
    pixels, target = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    images = (pixels / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    labels = target.astype(np.int32)
    return train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)


def make_steps(apply_fn, optimizer):
    """The jitted training step (Adam on the params, dropout on) and test accuracy."""

    @jax.jit
    def train_step(variables, opt_state, rng, x, y):
        def loss_fn(params):
            logits, new_variables = apply_fn(
                {**variables, "params": params}, rng, x, is_training=True
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new_variables

        (loss, new_variables), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        # new_variables carries the updated non-trainable collections (none in this model;
        # BatchNorm's running statistics would be there); the new params come from optax.
        return {**new_variables, "params": params}, opt_state, loss

    @jax.jit
    def accuracy(variables, x, y):
        logits, _ = apply_fn(variables, None, x)  # is_training=False: no dropout, no key
        return jnp.mean(jnp.argmax(logits, axis=-1) == y)

    return train_step, accuracy


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/digits"), help="output directory")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and dropout keys")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    x_train, x_test, y_train, y_test = load_data()

    model = ConvNet()
    print(model)
    init_fn, apply_fn = mx.transform(model)
    init_key, dropout_key = jax.random.split(jax.random.key(args.seed))
    variables = init_fn(init_key)
    print(f"{len(x_train)} train and {len(x_test)} test images")

    # Shuffle every epoch and drop the last partial batch: every step has the same shapes, so
    # train_step compiles once.
    data_rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(x_train) // args.batch_size
    # Cosine decay to zero: the last epochs settle instead of bouncing around the optimum.
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch))
    opt_state = optimizer.init(variables["params"])

    train_step, accuracy = make_steps(apply_fn, optimizer)

    history = {"train_loss": [], "test_accuracy": []}
    progress = tqdm(range(1, args.epochs + 1), desc="train", unit="epoch")
    for _ in progress:
        order = data_rng.permutation(len(x_train))
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            dropout_key, step_key = jax.random.split(dropout_key)
            variables, opt_state, loss = train_step(
                variables, opt_state, step_key, x_train[batch], y_train[batch]
            )
            losses.append(loss)
        history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["test_accuracy"].append(float(accuracy(variables, x_test, y_test)))
        progress.set_postfix(
            loss=f"{history['train_loss'][-1]:.4f}", test_acc=f"{history['test_accuracy'][-1]:.4f}"
        )

    test_accuracy = history["test_accuracy"][-1]
    seconds = time.perf_counter() - start
    print(f"test accuracy: {test_accuracy:.4f} ({len(x_test)} held-out images), {seconds:.1f} s")

    save_curves(history, args.out / "curves.png")
    metrics = {
        "test_accuracy": test_accuracy,
        "seconds": seconds,
        "history": history,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # Variables are a plain nested dict; store each array under its path.
    np.savez(
        args.out / "variables.npz",
        allow_pickle=False,
        **{
            "/".join(key.key for key in path): np.asarray(array)
            for path, array in jax.tree_util.tree_leaves_with_path(variables)
        },
    )
    print(f"wrote curves.png, metrics.json and variables.npz to {args.out}")


def save_curves(history, path):
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, history["train_loss"])
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="training loss", yscale="log")
    acc_ax.plot(epochs, history["test_accuracy"], label="test")
    acc_ax.axhline(0.97, color="gray", linestyle="--", linewidth=1, label="97%")
    bottom = min(0.8, *history["test_accuracy"])
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="test accuracy", ylim=(bottom, 1.0))
    acc_ax.legend(loc="lower right")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
