"""torch_conversions: the layout walk that load_state_dict and to_state_dict rest on."""

import numpy as np
import pytest

import metoryx as mx
from metoryx.layout import same, torch_conversions, torch_only, transposed


def _names(module):
    return [(c.torch_keys, c.variables) for c in torch_conversions(module)]


def test_default_names_follow_attributes_lists_and_dicts():
    class Net(mx.Module):
        def __init__(self):
            self.blocks = [mx.Dense(2, 2, use_bias=False), mx.LayerNorm(2)]
            self.heads = {"a": mx.Dense(2, 1, use_bias=False)}
            self.temperature = mx.Parameter(mx.initializers.ones, ())

    assert _names(Net()) == [
        (("blocks.0.weight",), ("blocks/0/kernel",)),
        (("blocks.1.weight",), ("blocks/1/scale",)),
        (("blocks.1.bias",), ("blocks/1/bias",)),
        (("heads.a.weight",), ("heads/a/kernel",)),
        (("temperature",), ("temperature",)),
    ]


def test_a_shared_module_is_listed_at_each_name():
    class Shared(mx.Module):
        def __init__(self):
            self.first = mx.Dense(2, 2, use_bias=False)
            self.second = self.first

    assert _names(Shared()) == [
        (("first.weight",), ("first/kernel",)),
        (("second.weight",), ("second/kernel",)),
    ]


def test_sequential_drops_its_layers_prefix_and_keeps_torch_only_entries_once():
    names = _names(mx.Sequential(mx.Dense(2, 2), mx.relu, mx.BatchNorm(2)))
    assert [keys for keys, _ in names] == [
        ("0.weight",),
        ("0.bias",),
        ("2.weight",),
        ("2.running_mean",),
        ("2.running_var",),
        ("2.num_batches_tracked",),
        ("2.bias",),
    ]


def test_conversions_invert_each_other():
    conversion = transposed("weight", "kernel", (2, 3, 1, 0))
    weight = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    (kernel,) = conversion.to_metoryx(weight)
    assert kernel.shape == (4, 5, 3, 2)
    np.testing.assert_array_equal(conversion.to_torch(kernel)[0], weight)
    assert torch_only("steps", 3).to_metoryx(np.ones(())) == ()


def test_converting_part_of_a_sub_module_is_an_error():
    class Partial(mx.Module):
        def __init__(self):
            self.inner = mx.Dense(2, 2)

        def torch_conversions(self):
            return [same("w", "inner/kernel")]

    with pytest.raises(mx.errors.ModuleStructureError) as info:
        torch_conversions(Partial())
    message = str(info.value)
    assert "sub-module 'inner' but not ['inner/bias']" in message
    assert "torch_conversions(self.inner)" in message


def test_naming_a_missing_variable_is_an_error():
    class Typo(mx.Module):
        def __init__(self):
            self.kernel = mx.Parameter(mx.initializers.ones, (2,))

        def torch_conversions(self):
            return [same("weight", "kernal")]

    with pytest.raises(mx.errors.ModuleStructureError, match=r"does not have: \['kernal'\]"):
        torch_conversions(Typo())
