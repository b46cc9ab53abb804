"""load_state_dict / to_state_dict: each layer against its PyTorch twin, weights moved by the
state_dict, forward within 1e-5 and gradients (inputs and parameters) within 1e-4."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.interop.torch import load_state_dict, to_state_dict

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4


def _channels_last(ndim):
    return (0, *range(2, ndim + 2), 1)


# name: (torch module factory, our layer factory, torch input shape, input layout, kwargs of
# our call). The input layout is the permutation from torch's layout to ours (also applied to
# the output); None for the same layout.
CASES = {
    "linear": (lambda nn: nn.Linear(5, 3), lambda: mx.Dense(5, 3), (2, 4, 5), None, {}),
    "linear_no_bias": (
        lambda nn: nn.Linear(5, 3, bias=False),
        lambda: mx.Dense(5, 3, use_bias=False),
        (4, 5),
        None,
        {},
    ),
    "conv1d": (
        lambda nn: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        lambda: mx.Conv(3, 4, (3,), strides=2, padding=1),
        (2, 3, 9),
        _channels_last(1),
        {},
    ),
    "conv2d_groups_dilation": (
        lambda nn: nn.Conv2d(4, 6, (3, 2), (2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
        lambda: mx.Conv(
            4, 6, (3, 2), strides=(2, 1), padding=((1, 1), (0, 0)), dilation=(1, 2), groups=2
        ),
        (2, 4, 7, 6),
        _channels_last(2),
        {},
    ),
    "conv2d_depthwise": (
        lambda nn: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        lambda: mx.Conv(4, 4, (3, 3), padding=1, groups=4, use_bias=False),
        (1, 4, 5, 5),
        _channels_last(2),
        {},
    ),
    "conv3d": (
        lambda nn: nn.Conv3d(2, 3, (2, 3, 2), padding=(1, 0, 1)),
        lambda: mx.Conv(2, 3, (2, 3, 2), padding=(1, 0, 1)),
        (1, 2, 4, 5, 3),
        _channels_last(3),
        {},
    ),
    "conv_transpose1d": (
        lambda nn: nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1),
        lambda: mx.ConvTranspose(3, 2, (3,), strides=2, output_padding=1),
        (2, 3, 4),
        _channels_last(1),
        {},
    ),
    "conv_transpose2d_groups": (
        lambda nn: nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, groups=2),
        lambda: mx.ConvTranspose(4, 6, (3, 2), strides=2, padding=1, groups=2),
        (2, 4, 3, 3),
        _channels_last(2),
        {},
    ),
    "conv_transpose3d": (
        lambda nn: nn.ConvTranspose3d(2, 3, 2, stride=(1, 2, 2), output_padding=(0, 1, 0)),
        lambda: mx.ConvTranspose(2, 3, (2, 2, 2), strides=(1, 2, 2), output_padding=(0, 1, 0)),
        (1, 2, 3, 2, 3),
        _channels_last(3),
        {},
    ),
    "batch_norm1d_train": (
        lambda nn: nn.BatchNorm1d(3, momentum=0.2).train(),
        lambda: mx.BatchNorm(3, momentum=0.8),
        (6, 3),
        None,
        {"is_training": True},
    ),
    "batch_norm2d_train": (
        lambda nn: nn.BatchNorm2d(3, momentum=0.2).train(),
        lambda: mx.BatchNorm(3, momentum=0.8),
        (2, 3, 4, 3),
        _channels_last(2),
        {"is_training": True},
    ),
    "batch_norm2d_eval": (
        lambda nn: nn.BatchNorm2d(3).eval(),
        lambda: mx.BatchNorm(3),
        (2, 3, 4, 3),
        _channels_last(2),
        {"is_training": False},
    ),
    "layer_norm": (lambda nn: nn.LayerNorm(5), lambda: mx.LayerNorm(5), (2, 3, 5), None, {}),
    "rms_norm": (
        lambda nn: nn.RMSNorm(5, eps=1e-6),
        lambda: mx.RMSNorm(5, epsilon=1e-6),
        (3, 5),
        None,
        {},
    ),
    "group_norm": (
        lambda nn: nn.GroupNorm(2, 4),
        lambda: mx.GroupNorm(2, 4),
        (2, 4, 3, 3),
        _channels_last(2),
        {},
    ),
    "instance_norm": (
        lambda nn: nn.InstanceNorm2d(3, affine=True),
        lambda: mx.InstanceNorm(3),
        (2, 3, 4, 4),
        _channels_last(2),
        {},
    ),
    "prelu": (lambda nn: nn.PReLU(3), lambda: mx.PReLU(3), (2, 3, 4), _channels_last(1), {}),
}


def _randomize(torch, module):
    """Every floating parameter and buffer drawn anew (PyTorch starts norms at ones and zeros,
    which would hide a swapped or dropped entry)."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                fresh = torch.randn_like(tensor)
                tensor.copy_(fresh.abs() + 0.5 if "var" in name else fresh)


def _permuted(array, perm):
    return array if perm is None else np.transpose(array, perm)


@pytest.mark.parametrize("case", CASES)
def test_layer_matches_torch_through_its_state_dict(torch, case):
    make_theirs, make_ours, shape, layout, kwargs = CASES[case]
    theirs, ours = make_theirs(torch.nn), make_ours()
    _randomize(torch, theirs)
    variables = load_state_dict(ours, theirs.state_dict())
    _, apply_fn = mx.transform(ours)

    x = torch.randn(*shape, requires_grad=True)
    expected = theirs(x)
    cotangent = torch.randn_like(expected)
    (expected * cotangent).sum().backward()

    def forward(params, x):
        return apply_fn({**variables, "params": params}, None, x, **kwargs)

    x_ours = jnp.asarray(_permuted(x.detach().numpy(), layout))
    (y, new_variables), vjp = jax.vjp(forward, variables["params"], x_ours)
    np.testing.assert_allclose(
        y, _permuted(expected.detach().numpy(), layout), atol=FORWARD_TOL, rtol=FORWARD_TOL
    )
    cot = jnp.asarray(_permuted(cotangent.numpy(), layout))
    zeros = jax.tree.map(jnp.zeros_like, new_variables)
    grad_params, grad_x = vjp((cot, zeros))
    np.testing.assert_allclose(
        grad_x, _permuted(x.grad.numpy(), layout), atol=GRAD_TOL, rtol=GRAD_TOL
    )
    # The gradient laid out by to_state_dict is PyTorch's .grad, entry by entry.
    grads = to_state_dict(ours, {**variables, "params": grad_params})
    for name, parameter in theirs.named_parameters():
        np.testing.assert_allclose(
            grads[name], parameter.grad.numpy(), atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name
        )
    # Running statistics after the step are PyTorch's buffers: means and variances over the
    # batch, summed in PyTorch's order and ours. A mean may cancel to near 0, so the bound is
    # at the scale of the terms summed (x, and squares of deviations): tests/_tolerance.py.
    after = to_state_dict(ours, new_variables)
    terms = (1 + float(np.abs(x.detach().numpy()).max())) ** 2
    for name, buffer in theirs.named_buffers():
        if buffer.is_floating_point():
            assert_close(after[name], buffer.numpy(), n=x.numel(), scale=terms, err_msg=name)


def test_embedding_matches_torch_through_its_state_dict(torch):
    theirs = torch.nn.Embedding(7, 4)
    ours = mx.Embed(7, 4)
    variables = load_state_dict(ours, theirs.state_dict())
    ids = torch.tensor([[0, 6, 2], [3, 3, 1]])
    y, _ = mx.apply(ours)(variables, None, jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(y, theirs(ids).detach().numpy(), atol=FORWARD_TOL)


def test_round_trip_and_torch_loads_the_result(torch):
    class Net(mx.Module):
        def __init__(self):
            self.features = mx.Sequential(mx.Conv(3, 4, (3, 3)), mx.BatchNorm(4), mx.relu)
            self.head = mx.Dense(4, 2)

    theirs = torch.nn.ModuleDict(
        {
            "features": torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
            ),
            "head": torch.nn.Linear(4, 2),
        }
    )
    model = Net()
    variables = mx.init(model)(jax.random.key(0))
    state_dict = to_state_dict(model, variables)
    assert list(state_dict) == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.running_mean",
        "features.1.running_var",
        "features.1.num_batches_tracked",
        "features.1.bias",
        "head.weight",
        "head.bias",
    ]
    theirs.load_state_dict(state_dict)  # strict: every entry named and shaped as PyTorch's
    back = load_state_dict(model, theirs.state_dict())
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_numpy_arrays_and_dtypes():
    state_dict = {"weight": np.arange(6.0).reshape(3, 2), "bias": np.zeros(3, np.float16)}
    variables = load_state_dict(mx.Dense(2, 3, param_dtype=jnp.bfloat16), state_dict)
    kernel = variables["params"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and variables["params"]["bias"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel.astype(np.float32), np.arange(6.0).reshape(3, 2).T)


def test_bfloat16_tensors_both_ways(torch):
    theirs = torch.nn.Linear(2, 3).to(torch.bfloat16)
    model = mx.Dense(2, 3, param_dtype=jnp.bfloat16)
    variables = load_state_dict(model, theirs.state_dict())
    state_dict = to_state_dict(model, variables)
    assert state_dict["weight"].dtype == torch.bfloat16
    assert torch.equal(state_dict["weight"], theirs.weight.detach())


def test_tied_weights_are_read_at_their_first_name(torch):
    class Tied(mx.Module):
        def __init__(self):
            self.embed = mx.Embed(5, 3)
            self.decode = mx.Embed(5, 3)
            self.decode.embedding = self.embed.embedding

    model = Tied()
    table = np.arange(15.0, dtype=np.float32).reshape(5, 3)
    variables = load_state_dict(model, {"embed.weight": table, "decode.weight": table})
    assert list(variables["params"]) == ["embed"]
    np.testing.assert_array_equal(variables["params"]["embed"]["embedding"], table)
    state_dict = to_state_dict(model, variables)
    assert list(state_dict) == ["embed.weight", "decode.weight"]
    assert torch.equal(state_dict["embed.weight"], state_dict["decode.weight"])


class _Small(mx.Module):
    def __init__(self, hidden=4):
        self.fc1 = mx.Dense(3, hidden)
        self.fc2 = mx.Dense(hidden, 2)


def _state_dict(hidden=4):
    return {
        "fc1.weight": np.ones((hidden, 3), np.float32),
        "fc1.bias": np.ones(hidden, np.float32),
        "fc2.weight": np.ones((2, hidden), np.float32),
        "fc2.bias": np.ones(2, np.float32),
    }


def test_missing_and_unexpected_entries_are_listed_by_name():
    state_dict = _state_dict()
    del state_dict["fc2.weight"]
    state_dict["fc3.weight"] = np.ones((2, 2), np.float32)
    with pytest.raises(mx.errors.VariablesStructureError) as info:
        load_state_dict(_Small(), state_dict)
    message = str(info.value)
    assert "Missing (1): fc2.weight (for params/fc2/kernel)" in message
    assert "Unexpected (1): fc3.weight" in message
    assert "attribute names must mirror" in message and "strict=False" in message


def test_state_dict_of_another_architecture_names_the_misfits():
    with pytest.raises(mx.errors.VariableShapeError) as info:
        load_state_dict(_Small(hidden=4), _state_dict(hidden=5))
    message = str(info.value)
    assert "fc1.weight: expected (4, 3), got (5, 3) (for params/fc1/kernel)" in message
    assert "fc2.weight: expected (2, 4), got (2, 5)" in message
    assert "fc1.bias: expected (4,), got (5,) (for params/fc1/bias)" in message
    assert "print(model)" in message


def test_a_conversion_that_cannot_apply_is_a_shape_error():
    model = mx.ConvTranspose(4, 6, (3, 2), groups=2)
    with pytest.raises(mx.errors.VariableShapeError, match=r"weight: expected \(4, 3, 3, 2\)"):
        load_state_dict(model, {"weight": np.ones((5, 3, 3, 2)), "bias": np.ones(6)})


def test_partial_load_fills_the_rest_from_given_variables():
    state_dict = _state_dict()
    del state_dict["fc2.weight"], state_dict["fc2.bias"]
    state_dict["extra"] = np.ones(1)
    base = mx.init(_Small())(jax.random.key(0))
    variables = load_state_dict(_Small(), state_dict, strict=False, variables=base)
    np.testing.assert_array_equal(variables["params"]["fc1"]["kernel"], np.ones((3, 4)))
    np.testing.assert_array_equal(
        variables["params"]["fc2"]["kernel"], base["params"]["fc2"]["kernel"]
    )
    with pytest.raises(mx.errors.VariablesStructureError, match="variables=init_fn"):
        load_state_dict(_Small(), state_dict, strict=False)


def test_to_state_dict_lists_variables_it_lacks():
    variables = mx.init(_Small())(jax.random.key(0))
    del variables["params"]["fc2"]
    with pytest.raises(mx.errors.VariablesStructureError, match="params/fc2/kernel"):
        to_state_dict(_Small(), variables)


@pytest.mark.parametrize("key", ["a/b", "a.b"])
def test_a_key_that_would_name_two_layers_alike_is_refused_both_ways(key):
    class Clash(mx.Module):
        def __init__(self):
            self.heads = {key: mx.Dense(2, 2), "a": {"b": mx.Dense(2, 3)}}

    state_dict = {"heads.a.b.weight": np.ones((2, 2)), "heads.a.b.bias": np.ones(2)}
    with pytest.raises(mx.errors.ModuleStructureError, match=repr(key)):
        load_state_dict(Clash(), state_dict)
    with pytest.raises(mx.errors.ModuleStructureError, match=repr(key)):
        to_state_dict(Clash(), {})


# A str is the path of a safetensors file (tests/interop/test_safetensors_files.py).
@pytest.mark.parametrize("state_dict", [[("weight", np.ones((4, 3)))], None, 3])
def test_a_state_dict_that_is_no_dict_is_refused(state_dict):
    with pytest.raises(mx.errors.VariablesStructureError, match="`state_dict` must be a dict"):
        load_state_dict(mx.Dense(3, 4), state_dict)


@pytest.mark.parametrize("strict", ["no", None, 0, np.ones(2)])
def test_strict_must_be_a_bool(strict):
    # Found by tests/test_bad_arguments.py: any truthy value meant strict, any falsy one not.
    state_dict = {"weight": np.ones((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    with pytest.raises(mx.errors.LayerConfigError, match="^load_state_dict: `strict` must be"):
        load_state_dict(mx.Dense(3, 4), state_dict, strict=strict)


def test_partial_load_base_variables_and_to_state_dict_variables_must_be_dicts():
    with pytest.raises(mx.errors.VariablesStructureError, match="`variables` must be a dict"):
        load_state_dict(mx.Dense(3, 4), {}, strict=False, variables=[1])
    with pytest.raises(mx.errors.VariablesStructureError, match="`variables` must be a dict"):
        to_state_dict(mx.Dense(3, 4), [np.ones((3, 4)), np.ones(4)])


@pytest.mark.parametrize(
    ("weight", "got"),
    [("abc", "<U3"), ([[1.0], [1.0, 2.0]], "object"), (np.array([None] * 12), "object")],
)
def test_entries_that_are_no_arrays_of_numbers_are_named(weight, got):
    state_dict = {"weight": weight, "bias": np.zeros(4)}
    with pytest.raises(mx.errors.VariableDtypeError, match=rf"weight \({got}\)"):
        load_state_dict(mx.Dense(3, 4), state_dict)
    with pytest.raises(mx.errors.VariablesStructureError, match="must be strs"):
        load_state_dict(mx.Dense(3, 4), {0: np.ones((4, 3)), "bias": np.zeros(4)})


def test_to_state_dict_names_arrays_of_the_wrong_shape_or_kind():
    variables = {"params": {"kernel": np.ones((4, 3)), "bias": np.zeros(4)}}
    with pytest.raises(
        mx.errors.VariableShapeError, match=r"params/kernel: expected float32\[3, 4\]"
    ):
        to_state_dict(mx.Dense(3, 4), variables)
    variables = {"params": {"kernel": np.full((3, 4), "x"), "bias": np.zeros(4)}}
    with pytest.raises(mx.errors.VariableDtypeError, match="params/kernel"):
        to_state_dict(mx.Dense(3, 4), variables)


def test_to_state_dict_without_torch_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees without it
    variables = mx.init(_Small())(jax.random.key(0))
    with pytest.raises(ImportError, match="pip install torch"):
        to_state_dict(_Small(), variables)


class _StackedDense(mx.Module):
    def __init__(self):
        self.blocks = mx.Repeat(lambda: mx.Dense(3, 3), 2)


class _UnrolledDense(mx.Module):
    def __init__(self):
        self.blocks = [mx.Dense(3, 3) for _ in range(2)]


_UNROLLED_STATE = {
    f"blocks.{i}.{name}": np.full(shape, float(i), np.float32)
    for i in range(2)
    for name, shape in (("weight", (3, 3)), ("bias", (3,)))
}


def test_a_stacked_model_loads_through_its_unrolled_twin_and_mx_stack():
    with pytest.raises(mx.errors.LayerConfigError, match=r"params/blocks/kernel.*mx\.stack"):
        load_state_dict(_StackedDense(), _UNROLLED_STATE)
    variables = mx.stack(_StackedDense(), load_state_dict(_UnrolledDense(), _UNROLLED_STATE))
    np.testing.assert_array_equal(variables["params"]["blocks"]["bias"], [[0.0] * 3, [1.0] * 3])


def test_a_stacked_model_saves_through_mx_unstack_and_its_unrolled_twin(torch):
    variables = mx.stack(_StackedDense(), load_state_dict(_UnrolledDense(), _UNROLLED_STATE))
    back = to_state_dict(_UnrolledDense(), mx.unstack(_StackedDense(), variables))
    assert isinstance(back["blocks.1.weight"], torch.Tensor)
    np.testing.assert_array_equal(
        back["blocks.1.weight"].numpy(), _UNROLLED_STATE["blocks.1.weight"]
    )
