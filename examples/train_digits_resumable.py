"""Train the digits ConvNet with orbax checkpoints: kill it at any moment, run it again, it resumes.

The recipe of docs/checkpoints.md ("Training runs with orbax") as a program. The training state
is a plain dict, ``{"variables": variables, "opt_state": opt_state}``, and orbax-checkpoint's
``CheckpointManager`` saves it as it is: every ``--save-every`` steps, in a background thread
while training goes on, keeping the last ``--keep`` checkpoints and the one with the best test
accuracy. Started again with the same ``--dir``, it restores the latest checkpoint and goes on
from there. Each step's batch and dropout key follow from the step number alone, so a run
killed and resumed ends with the very same bits as a run never interrupted.

    pip install 'metoryx[examples,checkpoints,orbax]'
    python examples/train_digits_resumable.py --dir out/run --steps 600

``--init-from FILE`` starts a new run from variables written by ``mx.save`` (fine-tuning);
``--export FILE`` writes the best checkpoint's variables with ``mx.save`` at the end, one
safetensors file that any safetensors reader opens.
"""

import argparse
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from train_digits import ConvNet, load_data, make_steps

import metoryx as mx


def batch_indices(step, n_train, batch_size, seed):
    """The examples of ``step``: a fresh shuffle per epoch, seeded by the epoch number."""
    steps_per_epoch = n_train // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n_train)
    return order[index * batch_size : (index + 1) * batch_size]


def checkpoint_manager(directory, save_every, keep):
    """Save every ``save_every`` steps; keep the latest ``keep`` and the best test accuracy."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=keep),
            # BestN ranks ascending and keeps the top n: the highest accuracy.
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["test_accuracy"], n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        preservation_policy=policy,
        best_fn=lambda m: m["test_accuracy"],  # what manager.best_step() ranks by
        best_mode="max",
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("out/run"), help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=600, help="total training steps")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--keep", type=int, default=3, help="latest checkpoints kept")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, data and dropout")
    parser.add_argument("--init-from", type=Path, help="start from variables saved by mx.save")
    parser.add_argument("--export", type=Path, help="mx.save the best variables to this file")
    args = parser.parse_args()

    x_train, x_test, y_train, y_test = load_data()
    init_fn, apply_fn = mx.transform(ConvNet())
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))
    train_step, accuracy = make_steps(apply_fn, optimizer)
    init_key, dropout_key = jax.random.split(jax.random.key(args.seed))

    def start_state(variables):
        return {"variables": variables, "opt_state": optimizer.init(variables["params"])}

    # The restore target: the state's shapes and dtypes, computed without computing an array.
    abstract_state = jax.eval_shape(lambda key: start_state(init_fn(key)), init_key)

    with checkpoint_manager(args.dir, args.save_every, args.keep) as manager:
        start = manager.latest_step()
        if start is not None:
            state = manager.restore(start, args=ocp.args.StandardRestore(abstract_state))
            print(f"resumed from step {start}", flush=True)
        elif args.init_from is not None:
            start, state = 0, start_state(mx.load(args.init_from, like=abstract_state["variables"]))
        else:
            start, state = 0, start_state(init_fn(init_key))

        for step in range(start, args.steps + 1):
            # should_save is False for a step already on disk: the one just resumed from.
            if manager.should_save(step) or (step == args.steps and step > start):
                test_accuracy = float(accuracy(state["variables"], x_test, y_test))
                print(f"step {step}: saving, test accuracy {test_accuracy:.4f}", flush=True)
                # Returns once the arrays are copied off the device; the files are written in
                # the background while the next steps train.
                manager.save(
                    step,
                    args=ocp.args.StandardSave(state),
                    metrics={"test_accuracy": test_accuracy},
                    force=True,
                )
            if step == args.steps:
                break
            batch = batch_indices(step, len(x_train), args.batch_size, args.seed)
            step_key = jax.random.fold_in(dropout_key, step)
            variables, opt_state, _ = train_step(
                state["variables"], state["opt_state"], step_key, x_train[batch], y_train[batch]
            )
            state = {"variables": variables, "opt_state": opt_state}

        manager.wait_until_finished()
        best = manager.best_step()
        print(f"best step {best}: test accuracy {manager.metrics(best)['test_accuracy']:.4f}")
        if args.export is not None:
            best_state = manager.restore(best, args=ocp.args.StandardRestore(abstract_state))
            mx.save(args.export, best_state["variables"])
            print(f"wrote the variables of step {best} to {args.export}")


if __name__ == "__main__":
    main()
