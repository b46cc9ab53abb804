"""Tests of metoryx/tagging.py: tag, untag, freeze, unfreeze, and freezing that really freezes
(the fine-tuning recipe of docs/finetuning.md on the digits ConvNet of the example)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metoryx as mx
from metoryx import errors
from tests._finetune import accuracy, digits_example, fit


def test_tag_reaches_every_variable_of_a_subtree_once():
    shared = mx.Dense(2, 2)
    model = mx.Sequential(shared, mx.Sequential(shared, mx.LayerNorm(2)), mx.Dense(2, 1))
    assert mx.tag(model.layers[1], "backbone", "slow") is model.layers[1]
    assert shared.kernel.tags == ("backbone", "slow")
    assert model.layers[1].layers[1].scale.tags == ("backbone", "slow")
    assert model.layers[2].kernel.tags == ()
    mx.tag(model.layers[1], "backbone")  # tagging twice keeps one tag
    assert shared.kernel.tags == ("backbone", "slow")
    mx.untag(model, "slow", "absent")
    assert shared.kernel.tags == ("backbone",)


def test_tag_takes_a_variable_and_containers_of_modules():
    layers = [mx.Dense(2, 2), {"a": mx.Dense(2, 2)}]
    mx.tag(layers, "x")
    assert layers[0].bias.tags == ("x",) and layers[1]["a"].kernel.tags == ("x",)
    kernel = mx.tag(mx.Dense(2, 2).kernel, "y")
    assert kernel.tags == ("y",)


def test_freeze_and_unfreeze_are_the_frozen_tag():
    model = mx.Sequential(mx.Dense(2, 2), mx.Dense(2, 1))
    mx.freeze(model)
    mx.unfreeze(model.layers[1])
    info = mx.variable_info(model)
    assert info["params"]["layers"]["0"]["kernel"].tags == ("frozen",)
    assert info["params"]["layers"]["1"]["kernel"].tags == ()
    variables = mx.init(model)(jax.random.key(0))
    trainable = mx.filter(variables, mx.filters.trainable, info)
    assert list(trainable["params"]["layers"]) == ["1"]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: mx.tag(mx.Dense(2, 2)), errors.VariableDefinitionError, "at least one tag"),
        (lambda: mx.tag(mx.Dense(2, 2), 3), errors.VariableDefinitionError, "tags must be"),
        (lambda: mx.tag(mx.Dense(2, 2), ""), errors.VariableDefinitionError, "tags must be"),
        (lambda: mx.freeze("encoder"), errors.ModuleStructureError, "got str 'encoder'"),
        (lambda: mx.untag([], "x"), errors.ModuleStructureError, "non-empty list"),
    ],
)
def test_bad_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- the fine-tuning recipe -----------------------------------------------------------------


def test_a_frozen_backbone_keeps_its_bits_and_the_optimizer_holds_only_the_head():
    example = digits_example()
    x_train, x_test, y_train, y_test = example.load_data()
    key = jax.random.key(0)

    # Pretrain the whole ConvNet briefly.
    model = example.ConvNet()
    init_fn, apply_fn = mx.transform(model)
    pretrained, _ = fit(apply_fn, init_fn(key), {}, x_train, y_train, optax.adam(3e-3), 150, key)
    assert accuracy(apply_fn, pretrained, x_test, y_test)[0] > 0.85

    # A new head on the pretrained backbone; everything but the head frozen.
    model = mx.assign_variables(model, pretrained)
    model.fc2 = mx.Dense(128, 10)
    mx.freeze(model)
    mx.unfreeze(model.fc2)
    transformed = mx.transform(model)
    info = mx.variable_info(transformed)
    start = transformed.init(jax.random.key(1))
    assert accuracy(transformed.apply, start, x_test, y_test)[0] < 0.5  # the head is new
    split = lambda v: mx.partition(v, mx.filters.trainable, info)  # noqa: E731
    trainable, frozen = split(start)
    optimizer = optax.adamw(3e-3, weight_decay=0.1)
    trained, state = fit(
        transformed.apply, trainable, frozen, x_train, y_train, optimizer, 100, key
    )
    tuned = mx.combine(trained, frozen)
    assert accuracy(transformed.apply, tuned, x_test, y_test)[0] > 0.85

    # Frozen arrays: bit-identical to the pretrained ones.
    frozen_before = mx.filter(start, mx.filters.frozen, info)
    frozen_after = mx.filter(tuned, mx.filters.frozen, info)
    assert sorted(frozen_after["params"]) == ["conv1", "conv2", "fc1"]
    for before, after, old in zip(
        jax.tree.leaves(frozen_before),
        jax.tree.leaves(frozen_after),
        jax.tree.leaves(mx.filter(pretrained, ["params/conv1", "params/conv2", "params/fc1"])),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
        np.testing.assert_array_equal(np.asarray(after), np.asarray(old))

    # The optimizer state holds the head only: Adam's two moments of its kernel and bias.
    shapes = sorted(a.shape for a in jax.tree.leaves(state) if a.ndim)
    assert shapes == [(10,), (10,), (128, 10), (128, 10)]
    # And no gradient of a frozen array is computed: the step's gradient program has the
    # head's shapes only among its outputs.
    trainable, frozen = split(tuned)
    grads = jax.eval_shape(
        lambda t, f: jax.grad(
            lambda t: jnp.sum(transformed.apply(mx.combine(t, f), None, x_test[:2])[0])
        )(t),
        trainable,
        frozen,
    )
    assert jax.tree.map(lambda a: a.shape, grads) == {
        "params": {"fc2": {"bias": (10,), "kernel": (128, 10)}}
    }
