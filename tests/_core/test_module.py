"""Tests of metoryx/_core/module.py: the definition world, structure errors and print(model)."""

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors
from metoryx._core.module import module_label


def paths(variables):
    """``{"params/a/kernel": shape, ...}`` of a variables dict."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}


class MLP(mx.Module):
    def __init__(self, sizes=(3, 4, 2)):
        super().__init__()
        self.layers = [mx.Dense(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.activation = jnp.tanh  # config: a function

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


Pair = collections.namedtuple("Pair", ["left", "right"])


class Everything(mx.Module):
    """Sub-modules, variables, lists/tuples/dicts of them, and config, without super().__init__."""

    def __init__(self):
        self.name = "everything"
        self.scale = 2.0
        self.table = np.arange(3.0)
        self.body = mx.Dense(3, 4)
        self.blocks = {"first": mx.Dense(4, 4), 7: mx.Dense(4, 4, use_bias=False)}
        self.pair = Pair(mx.Parameter(mx.initializers.ones, (4,)), 4)
        self.stack = (mx.Parameter(mx.initializers.zeros, (1,)), [mx.Dense(4, 2)])
        self.count = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.nothing = None

    def __call__(self, x):
        assert self.name == "everything" and self.scale == 2.0
        assert isinstance(self.table, np.ndarray)
        assert isinstance(self.pair, Pair) and self.pair.right == 4
        assert self.nothing is None
        self.count = self.count + 1
        h = self.blocks[7](self.blocks["first"](self.body(x)))
        h = h * self.pair.left[None, :] + self.stack[0][None, :]
        return self.stack[1][0](h) * self.scale


def test_every_kind_of_holder_gives_readable_paths():
    v = mx.init(Everything())(0)
    assert paths(v) == {
        "params/body/kernel": (3, 4),
        "params/body/bias": (4,),
        "params/blocks/first/kernel": (4, 4),
        "params/blocks/first/bias": (4,),
        "params/blocks/7/kernel": (4, 4),
        "params/pair/0": (4,),
        "params/stack/0": (1,),
        "params/stack/1/0/kernel": (4, 2),
        "params/stack/1/0/bias": (2,),
        "counters/count": (),
    }
    y, new = mx.apply(Everything())(v, None, jnp.ones((5, 3)))
    assert y.shape == (5, 2)
    assert int(new["counters"]["count"]) == 1


def test_lists_of_modules_give_index_paths():
    v = mx.init(MLP((3, 4, 4, 2)))(0)
    assert paths(v) == {
        "params/layers/0/kernel": (3, 4),
        "params/layers/0/bias": (4,),
        "params/layers/1/kernel": (4, 4),
        "params/layers/1/bias": (4,),
        "params/layers/2/kernel": (4, 2),
        "params/layers/2/bias": (2,),
    }


def test_dicts_of_lists_of_dicts_nest():
    class Deep(mx.Module):
        def __init__(self):
            self.tree = {"a": [{"b": mx.Dense(3, 4, use_bias=False)}], "c": (mx.Dense(4, 2),)}

        def __call__(self, x):
            return self.tree["c"][0](self.tree["a"][0]["b"](x))

    v = mx.init(Deep())(0)
    assert set(paths(v)) == {
        "params/tree/a/0/b/kernel",
        "params/tree/c/0/kernel",
        "params/tree/c/0/bias",
    }
    y, _ = mx.apply(Deep())(v, None, jnp.ones((1, 3)))
    assert y.shape == (1, 2)


def test_replacing_adding_and_deleting_submodules_reaches_transform():
    model = MLP()
    model.layers[1] = mx.Dense(4, 4)  # replace inside a list
    model.extra = mx.Dense(4, 2)  # add
    model.layers.append(mx.Dense(4, 4, use_bias=False))  # grow a list
    v = mx.init(model)(0)
    assert paths(v)["params/layers/1/kernel"] == (4, 4)
    assert paths(v)["params/extra/kernel"] == (4, 2)
    assert "params/layers/2/bias" not in paths(v)
    del model.extra
    del model.layers[2]
    v = mx.init(model)(0)
    assert set(paths(v)) == {f"params/layers/{i}/{n}" for i in "01" for n in ("kernel", "bias")}
    y, _ = mx.apply(model)(v, None, jnp.ones((2, 3)))
    assert y.shape == (2, 4)


def test_replacing_a_variable_attribute_with_config_removes_it():
    model = mx.Dense(3, 4)
    model.bias = None
    assert set(paths(mx.init(model)(0))) == {"params/kernel"}


def test_model_without_call_can_be_initialized_and_apply_names_the_method():
    class Encoder(mx.Module):
        def __init__(self):
            self.proj = mx.Dense(3, 4)

        def encode(self, x):
            return self.proj(x)

    init_fn, apply_fn = mx.transform(Encoder())
    v = init_fn(0)
    assert set(paths(v)) == {"params/proj/kernel", "params/proj/bias"}
    with pytest.raises(errors.MethodError) as info:
        apply_fn(v, None, jnp.ones((1, 3)))
    assert isinstance(info.value, AttributeError)
    assert "__call__" in str(info.value) and "method=" in str(info.value)
    with pytest.raises(errors.MethodError, match="method="):
        mx.apply(Encoder(), "__call__")(v, None, jnp.ones((1, 3)))
    y, _ = mx.apply(Encoder(), "encode")(v, None, jnp.ones((1, 3)))
    assert y.shape == (1, 4)


def test_config_attributes_read_unchanged_inside_apply():
    seen = {}

    class Configured(mx.Module):
        def __init__(self):
            self.rate = 0.25
            self.names = ["a", "b"]
            self.options = {"mode": "fast"}
            self.fn = jnp.square
            self.w = mx.Parameter(mx.initializers.ones, (2,))

        def __call__(self):
            seen.update(rate=self.rate, names=self.names, options=self.options)
            return self.fn(self.w) * self.rate

    model = Configured()
    y, _ = mx.apply(model)(mx.init(model)(0), None)
    np.testing.assert_allclose(y, [0.25, 0.25])
    assert seen == {"rate": 0.25, "names": ["a", "b"], "options": {"mode": "fast"}}


def test_transform_does_not_touch_the_model():
    model = MLP()
    before = dict(vars(model))
    layer0 = dict(vars(model.layers[0]))
    mx.transform(model).init(0)
    assert vars(model) == before
    assert vars(model.layers[0]) == layer0
    assert isinstance(model.layers[0].kernel, mx.Parameter)


def test_missing_attribute_is_our_attribute_error():
    with pytest.raises(errors.ModuleAttributeError, match="Dense has no attribute 'weight'"):
        _ = mx.Dense(2, 2).weight
    assert not hasattr(mx.Dense(2, 2), "weight")
    assert getattr(mx.Dense(2, 2), "weight", None) is None


def test_a_variable_deleted_in_the_definition_world_is_named_where_the_layer_reads_it():
    class Net(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(2, 3)

        def __call__(self, x):
            return self.fc(x)

    model = Net()
    del model.fc.bias
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(0)
    assert set(paths(variables)) == {"params/fc/kernel"}
    with pytest.raises(errors.ModuleAttributeError) as info:
        apply_fn(variables, None, jnp.ones((1, 2)))
    assert isinstance(info.value, AttributeError)
    message = str(info.value)
    assert "Dense at 'fc' has no attribute 'bias'" in message and "deleted" in message
    assert "use_bias=False" in message


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: mx.Dense(2, 3), "a module (Dense)"),
        (lambda: mx.Parameter(mx.initializers.zeros, (2,)), "a variable"),
        (lambda: [mx.Dense(2, 3)], "a list holding modules or variables"),
    ],
)
def test_creating_a_layer_or_variable_inside_apply_says_to_create_it_in_init(make, kind):
    class Lazy(mx.Module):
        def __call__(self, x):
            self.fc = make()
            return x

    with pytest.raises(errors.ImmutableModuleError) as info:
        mx.apply(Lazy())({}, None, jnp.ones(2))
    message = str(info.value)
    assert kind in message and "__init__" in message and "mx.State" not in message


@pytest.mark.parametrize(
    ("holder", "where", "got"),
    [
        ({"a/b": 1, "a": {"b": 2}}, "Holder.heads", "'a/b'"),
        ({"a.b": 1, "a": {"b": 2}}, "Holder.heads", "'a.b'"),
        ({"": 1}, "Holder.heads", "an empty name"),
        ({"x": {"a/b": 1}}, "Holder.heads/x", "'a/b'"),
    ],
)
def test_a_dict_key_holding_a_separator_is_an_error(holder, where, got):
    class Holder(mx.Module):
        def __init__(self):
            self.heads = {
                k: (mx.Dense(2, v) if isinstance(v, int) else {kk: mx.Dense(2, 2) for kk in v})
                for k, v in holder.items()
            }

    message = _structure_error(Holder())
    assert message.startswith(where) and got in message


def test_an_attribute_name_holding_a_separator_is_an_error_config_is_not():
    model = mx.Dense(2, 2)
    setattr(model, "a.b", 0.5)  # config: no path is made from it
    mx.transform(model)
    setattr(model, "c/d", mx.Dense(2, 2))
    assert "attribute 'c/d'" in _structure_error(model)


# ---------------------------------------------------------------------------------------------
# Structure errors


def _structure_error(model):
    with pytest.raises(errors.ModuleStructureError) as info:
        mx.transform(model)
    assert isinstance(info.value, TypeError) and isinstance(info.value, errors.MetoryxError)
    return str(info.value)


def test_cycle_is_an_error_naming_both_paths():
    class Node(mx.Module):
        def __init__(self):
            self.child = mx.Dense(2, 2)

    root = Node()
    root.inner = Node()
    root.inner.back = root
    message = _structure_error(root)
    assert "inner/back" in message and "<root>" in message and "cycle" in message


def test_self_reference_is_a_cycle():
    m = mx.Dense(2, 2)
    m.me = [m]
    assert "me/0" in _structure_error(m)


def test_int_and_str_keys_giving_the_same_path_are_an_error():
    class Clash(mx.Module):
        def __init__(self):
            self.heads = {1: mx.Dense(2, 2), "1": mx.Dense(2, 3)}

    message = _structure_error(Clash())
    assert "heads/1" in message and "1" in message and "'1'" in message


@pytest.mark.parametrize("holder", [set, frozenset])
def test_variable_in_a_set_is_an_error(holder):
    class InSet(mx.Module):
        def __init__(self):
            self.params_set = holder([mx.Parameter(mx.initializers.zeros, (2,))])

    message = _structure_error(InSet())
    assert "params_set" in message and holder.__name__ in message


class PlainHolder:
    def __init__(self, layer):
        self.layer = layer


class SlotHolder:
    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer


@pytest.mark.parametrize("holder", [PlainHolder, SlotHolder])
def test_variable_inside_a_non_module_object_is_an_error(holder):
    class Hidden(mx.Module):
        def __init__(self):
            self.config = holder(mx.Dense(2, 2))

    message = _structure_error(Hidden())
    assert "config" in message and holder.__name__ in message and "mx.Module" in message


def test_variable_nested_in_config_object_inside_a_list_is_an_error():
    class Hidden(mx.Module):
        def __init__(self):
            self.items = [1, PlainHolder({"w": mx.Parameter(mx.initializers.zeros, (2,))})]

    assert "items/1" in _structure_error(Hidden())


@pytest.mark.parametrize("key", [(1, 2), 1.5, None])
def test_module_under_a_non_str_int_key_is_an_error(key):
    class BadKey(mx.Module):
        def __init__(self):
            self.heads = {key: mx.Dense(2, 2)}

    message = _structure_error(BadKey())
    assert "heads" in message and repr(key) in message and "str and int" in message


def test_config_under_odd_keys_and_in_sets_is_fine():
    class Fine(mx.Module):
        def __init__(self):
            self.lookup = {(1, 2): "x", 1.5: [3]}
            self.tags = {"a", "b"}
            self.w = mx.Parameter(mx.initializers.zeros, (1,))

    assert set(paths(mx.init(Fine())(0))) == {"params/w"}


def test_transform_of_a_non_module_is_an_error():
    assert "mx.Module" in _structure_error(lambda x: x)


def test_uncopyable_attribute_is_an_error_saying_why():
    model = mx.Dense(2, 2)
    model.lock = threading.Lock()
    message = _structure_error(model)
    assert "deep-copies" in message and "Dense" in message


# ---------------------------------------------------------------------------------------------
# print(model) and module_label


def test_print_shows_tree_shapes_dtypes_count_and_ties():
    class Net(mx.Module):
        def __init__(self):
            self.encoder = mx.Dense(3, 4)
            self.decoder = self.encoder  # tied module
            self.blocks = [mx.Dense(4, 4, use_bias=False, param_dtype=jnp.bfloat16)]
            self.scale = mx.Parameter(mx.initializers.ones, (4,))
            self.scales = {"again": self.scale}  # tied parameter
            self.stats = mx.State("batch_stats", mx.initializers.zeros, (4,), mutable=False)

    text = repr(Net())
    assert text == str(Net())
    lines = text.splitlines()
    assert lines[0] == "Net("
    assert "  (encoder): Dense(" in lines
    assert "    in_size=3, out_size=4, use_bias=True" in lines
    assert "    (kernel): Parameter(float32[3, 4])" in lines
    assert "  (decoder): <tied to 'encoder'>" in lines
    assert "  (blocks/0): Dense(" in lines
    assert "    (kernel): Parameter(bfloat16[4, 4])" in lines
    assert "  (scales/again): <tied to 'scale'>" in lines
    assert "  (stats): State('batch_stats', float32[4], read-only)" in lines
    # 12 + 4 (encoder) + 16 (bfloat16 block) + 4 (scale); the tied entries are not counted twice.
    count = lines[-1]
    assert count.startswith("Total")
    assert "36 parameters" in count and "(112 B)" in count  # bfloat16 counts 2 bytes
    assert "4 batch_stats" in count and "(16 B)" in count


def test_print_counts_large_models_with_separators_and_units():
    text = repr(mx.Dense(50_000, 50_000))
    assert "Parameter(float32[50000, 50000])" in text
    assert "2,500,050,000" in text.splitlines()[-1] and "GiB" in text.splitlines()[-1]


def test_print_of_a_module_without_variables():
    class Empty(mx.Module):
        pass

    assert repr(Empty()).splitlines() == ["Empty()", "No variables."]


def test_print_shows_cycles_instead_of_recursing():
    m = mx.Dense(2, 2)
    m.again = [m]
    assert "<cycle back to '<root>'>" in repr(m)


def test_print_shows_fixed_values():
    m = mx.Dense(2, 2)
    m.kernel.value = jnp.eye(2)
    assert "(kernel): Parameter(float32[2, 2], value fixed)" in repr(m)


def test_module_label_outside_and_inside_apply():
    labels = []

    class Inner(mx.Module):
        def __call__(self):
            labels.append(module_label(self))

    class Outer(mx.Module):
        def __init__(self):
            self.blocks = [Inner(), Inner()]

        def __call__(self):
            labels.append(module_label(self))
            for b in self.blocks:
                b()

    model = Outer()
    assert module_label(model) == "Outer" and module_label(model.blocks[1]) == "Inner"
    mx.apply(model)({}, None)
    assert labels == ["Outer (root)", "Inner at 'blocks/0'", "Inner at 'blocks/1'"]
