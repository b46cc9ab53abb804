"""Tests of metoryx/_core/info.py: mx.variable_info, a tree of records shaped like variables."""

import jax
import jax.numpy as jnp
import pytest

import metoryx as mx
from metoryx import errors


class Block(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(4, 4)
        self.norm = mx.BatchNorm(4)

    def __call__(self, x, is_training=False):
        return self.norm(self.fc(x), is_training)


class Net(mx.Module):
    def __init__(self):
        self.embed = mx.Dense(3, 4)
        self.blocks = {"a": Block(), "b": [mx.LayerNorm(4)]}
        self.stack = mx.Repeat(mx.Dense(4, 4), 3)
        self.head = mx.Dense(4, 2)
        self.tied = self.embed  # the same module at a second path

    def __call__(self, x):
        x = self.blocks["a"](self.embed(x))
        return self.head(self.stack(self.blocks["b"][0](x)))


def _model():
    model = Net()
    model.embed.kernel.tags = ("backbone", "input")
    model.head.kernel.axes = ("embed", "vocab")
    return model


def test_the_tree_has_exactly_the_structure_of_variables():
    model = _model()
    transformed = mx.transform(model)
    variables = transformed.init(jax.random.key(0))
    for info in (mx.variable_info(model), mx.variable_info(transformed)):
        assert jax.tree.structure(info) == jax.tree.structure(variables)
        pairs = jax.tree.map(lambda a, i: (a.shape, a.dtype) == (i.shape, i.dtype), variables, info)
        assert all(jax.tree.leaves(pairs))


def test_records_name_path_owner_tags_axes_and_stacking():
    info = mx.variable_info(_model())
    kernel = info["params"]["embed"]["kernel"]
    assert kernel.path == ("params", "embed", "kernel")
    assert kernel.collection == "params" and kernel.shape == (3, 4)
    assert kernel.dtype == jnp.float32 and not kernel.mutable
    assert kernel.module is mx.Dense and kernel.module_path == ("embed",)
    assert kernel.module_types == (Net, mx.Dense)
    assert kernel.tags == ("backbone", "input") and kernel.axes is None and kernel.stacked == ()
    assert kernel.size == 12 and kernel.nbytes == 48

    mean = info["batch_stats"]["blocks"]["a"]["norm"]["mean"]
    assert mean.module is mx.BatchNorm and mean.module_types == (Net, Block, mx.BatchNorm)
    assert mean.mutable and mean.module_path == ("blocks", "a", "norm")

    # The Repeat template sits at the wrapper's path; the stack axis leads the shape.
    stacked = info["params"]["stack"]["kernel"]
    assert stacked.shape == (3, 4, 4) and stacked.stacked == (3,)
    assert stacked.module is mx.Dense and stacked.module_types == (Net, mx.Repeat, mx.Dense)
    assert info["params"]["head"]["kernel"].axes == ("embed", "vocab")


def test_axes_of_a_stacked_variable_start_with_none_per_stack_axis():
    layer = mx.Dense(4, 4)
    layer.kernel.axes = ("embed", "mlp")
    info = mx.variable_info(mx.Repeat(layer, 2))
    assert info["params"]["kernel"].axes == (None, "embed", "mlp")


def test_tied_modules_give_one_record_at_the_first_path():
    info = mx.variable_info(_model())
    assert "tied" not in info["params"]


def test_a_transformed_model_keeps_its_snapshot_and_computes_it_once():
    model = _model()
    transformed = mx.transform(model)
    first = mx.variable_info(transformed)
    mx.tag(model, "later")  # edits after the snapshot do not leak in
    assert mx.variable_info(transformed) is first
    assert "later" not in first["params"]["head"]["bias"].tags
    assert "later" in mx.variable_info(model)["params"]["head"]["bias"].tags


def test_records_are_frozen_and_jax_leaves():
    info = mx.variable_info(mx.Dense(2, 3))
    record = info["params"]["bias"]
    with pytest.raises(AttributeError):
        record.tags = ("x",)
    assert jax.tree.leaves(info) == [info["params"]["bias"], info["params"]["kernel"]]
    assert repr(record) == "VariableInfo('params/bias', float32[3], Dense at <root>)"


def test_param_dtype_is_the_recorded_storage_dtype():
    info = mx.variable_info(mx.Dense(2, 3, param_dtype=jnp.bfloat16))
    assert info["params"]["kernel"].dtype == jnp.bfloat16
    assert info["params"]["kernel"].nbytes == 12


@pytest.mark.parametrize("bad", [mx.Dense, "model", (mx.Dense(2, 2),), None])
def test_anything_but_a_model_or_transform_is_refused(bad):
    with pytest.raises(errors.ModuleStructureError, match="mx.variable_info takes"):
        mx.variable_info(bad)
