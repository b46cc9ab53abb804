"""mx.set_training: the switch set over a whole sub-tree (nested classes, lists, dicts, shared
layers, mx.Repeat), kept by the snapshot, its errors, and the fine-tuning case it exists for: a
backbone's BatchNorm in evaluation while the head's dropout trains, in one jitted step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors


class Block(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(4, 4)
        self.bn = mx.BatchNorm(4)

    def __call__(self, x, is_training):
        return mx.relu(self.bn(self.fc(x), is_training))


class Net(mx.Module):
    def __init__(self):
        self.backbone = Block()
        self.dropout = mx.Dropout(0.5)
        self.head = mx.Dense(4, 3)

    def __call__(self, x, is_training):
        return self.head(self.dropout(self.backbone(x, is_training), is_training))


def _assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


class Wide(mx.Module):
    """Switches in a list, a dict, a Repeat and a shared layer."""

    def __init__(self):
        shared = mx.Dropout(0.1)
        self.blocks = [Block(), Block()]
        self.heads = {"a": mx.MLP(4, [4], 2, dropout_rate=0.1), "b": shared}
        self.again = shared
        self.stack = mx.Repeat(lambda: mx.BatchNorm(4), 3)


def test_it_sets_every_switch_below_the_module_and_returns_it():
    model = Wide()
    assert mx.set_training(model, False) is model
    assert [b.bn.training for b in model.blocks] == [False, False]
    assert model.heads["a"].training is False and model.heads["b"].training is False
    assert model.again is model.heads["b"]
    assert model.stack.module.training is False  # the template every copy is made from
    assert model.blocks[0].fc.__dict__.get("training") is None  # a Dense has no switch


def test_none_restores_following_the_call_and_true_forces_training():
    model = Wide()
    mx.set_training(model, False)
    mx.set_training(model.blocks[1], True)
    assert (model.blocks[0].bn.training, model.blocks[1].bn.training) == (False, True)
    mx.set_training(model, None)
    assert model.blocks[1].bn.training is None and model.stack.module.training is None


def test_only_the_part_given_changes():
    model = Net()
    mx.set_training(model.backbone, False)
    assert model.backbone.bn.training is False
    assert model.dropout.training is None


def test_every_copy_of_a_repeat_evaluates_and_its_stacked_statistics_stay():
    stack = mx.set_training(mx.Repeat(lambda: mx.BatchNorm(4), 3), False)
    init_fn, apply_fn = mx.transform(stack)
    variables = init_fn(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    _, new = apply_fn(variables, None, x, is_training=True)
    assert new["batch_stats"]["mean"].shape == (3, 4)
    _assert_same_bits(new, variables)


def test_the_snapshot_keeps_the_mode_it_was_taken_with():
    model = Net()
    init_fn, follows = mx.transform(model)
    mx.set_training(model.backbone, False)
    _, evaluates = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    _, followed = follows(variables, jax.random.key(2), x, True)
    _, kept = evaluates(variables, jax.random.key(2), x, True)
    assert not np.array_equal(followed["batch_stats"]["backbone"]["bn"]["mean"], 0.0)
    _assert_same_bits(kept["batch_stats"], variables["batch_stats"])


def test_a_frozen_backbone_keeps_its_statistics_while_the_head_dropout_trains():
    model = Net()
    mx.set_training(model.backbone, False)
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    variables["batch_stats"]["backbone"]["bn"] = {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}
    x = jax.random.normal(jax.random.key(1), (8, 4))
    labels = jnp.arange(8) % 3

    @jax.jit
    def step(variables, key):
        def loss(params):
            logits, new = apply_fn({**variables, "params": params}, key, x, is_training=True)
            picked = jnp.take_along_axis(mx.log_softmax(logits), labels[:, None], axis=1)
            return -picked.mean(), (logits, new)

        grads, (logits, new) = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {**new, "params": params}, logits

    trained, logits = step(variables, jax.random.key(2))
    _assert_same_bits(trained["batch_stats"], variables["batch_stats"])
    kernel = trained["params"]["backbone"]["fc"]["kernel"]
    assert not np.array_equal(kernel, variables["params"]["backbone"]["fc"]["kernel"])
    # The backbone evaluates and the head's Dense is deterministic: only dropout differs.
    evaluated, _ = apply_fn(variables, None, x, is_training=False)
    assert not np.allclose(logits, evaluated)


@pytest.mark.parametrize("bad", ["eval", 0, 1, np.bool_(False), jnp.array(False)])
def test_a_mode_that_is_not_none_or_a_bool_is_refused(bad):
    model = Net()
    with pytest.raises(errors.LayerConfigError) as info:
        mx.set_training(model, bad)
    message = str(info.value)
    assert message.startswith("mx.set_training: `training`") and "got " in message
    assert model.backbone.bn.training is None  # nothing was set


def test_a_module_without_any_switch_is_an_error_naming_what_it_holds():
    class Plain(mx.Module):
        def __init__(self):
            self.layers = [mx.Dense(2, 2) for _ in range(8)]

    with pytest.raises(errors.LayerConfigError, match="no layer in this Plain") as info:
        mx.set_training(Plain(), False)
    message = str(info.value)
    assert "Plain, Dense at 'layers/0'," in message and "and 3 more" in message
    assert "training: bool | None = None" in message


def test_something_that_is_not_a_module_is_refused():
    with pytest.raises(errors.ModuleStructureError, match="Expected an mx.Module"):
        mx.set_training([mx.BatchNorm(2)], False)


def test_a_snapshot_cannot_be_switched_inside_apply():
    class Switching(mx.Module):
        def __init__(self):
            self.bn = mx.BatchNorm(2)

        def __call__(self, x):
            mx.set_training(self, False)
            return x

    init_fn, apply_fn = mx.transform(Switching())
    with pytest.raises(errors.ImmutableModuleError, match="'training'"):
        apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((2, 2)))
