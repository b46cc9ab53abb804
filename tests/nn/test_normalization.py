"""Normalization layers. BatchNorm: PyTorch parity in training and evaluation, running
statistics, cross-device statistics, numerical safety, dtypes and errors. LayerNorm, RMSNorm,
GroupNorm and InstanceNorm: PyTorch parity, what is pooled, numerical safety, dtypes and errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.nn.normalization import GroupNorm, InstanceNorm, LayerNorm, RMSNorm

CHANNELS_LAST = {2: None, 4: (0, 2, 3, 1)}  # PyTorch (N, C) / (N, C, H, W) -> ours
INITIAL_STATS = {"mean": jnp.zeros(3), "var": jnp.ones(3)}


def _variables(scale, bias, stats=INITIAL_STATS):
    return {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)], ids=["1d", "2d"])
def test_training_matches_torch(torch, assert_matches_torch, shape):
    _, apply_fn = mx.transform(mx.BatchNorm(3, epsilon=1e-3))
    assert_matches_torch(
        lambda x, scale, bias: apply_fn(_variables(scale, bias), None, x, True)[0],
        lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True, eps=1e-3),
        [torch.randn(*shape) * 2 + 1, torch.rand(3) + 0.5, torch.randn(3)],
        layouts=[CHANNELS_LAST[len(shape)], None, None],
        out_layout=CHANNELS_LAST[len(shape)],
    )


def test_running_statistics_and_evaluation_match_torch(torch, assert_matches_torch):
    reference = torch.nn.BatchNorm2d(3, momentum=0.2)
    _, apply_fn = mx.transform(mx.BatchNorm(3, momentum=0.8))
    step = jax.jit(lambda v, x: apply_fn(v, None, x, True))
    variables = _variables(jnp.ones(3), jnp.zeros(3))
    for i in range(3):
        x = torch.randn(4, 3, 3, 2) * (i + 1) + i
        expected = reference(x)
        y, variables = step(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(y, expected.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), rtol=1e-5)

    F = torch.nn.functional
    running = (reference.running_mean, reference.running_var)
    assert_matches_torch(
        lambda x, scale, bias: apply_fn(_variables(scale, bias, stats), None, x, False)[0],
        lambda x, w, b: F.batch_norm(x, *running, w, b, False, eps=reference.eps),
        [torch.randn(2, 3, 3, 2), torch.rand(3) + 0.5, torch.randn(3)],
        layouts=[CHANNELS_LAST[4], None, None],
        out_layout=CHANNELS_LAST[4],
    )


def test_evaluation_leaves_statistics_unchanged():
    _, apply_fn = mx.transform(mx.BatchNorm(3))
    stats = {"mean": jnp.arange(3.0), "var": jnp.full(3, 4.0)}
    x = jnp.arange(6.0).reshape(2, 3)
    y, new_variables = apply_fn(_variables(jnp.ones(3), jnp.zeros(3), stats), None, x, False)
    assert new_variables["batch_stats"] is not None
    np.testing.assert_array_equal(new_variables["batch_stats"]["mean"], stats["mean"])
    np.testing.assert_allclose(y, (x - stats["mean"][None]) / np.sqrt(4.0 + 1e-5), rtol=1e-6)


def test_variance_is_two_pass():
    # Mean 1000, spread 0.01: E[x^2] - E[x]^2 in float32 loses every digit of the variance.
    x = 1000 + 0.01 * np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    _, apply_fn = mx.transform(mx.BatchNorm(3, momentum=0.0, epsilon=0.0))
    y, variables = apply_fn(_variables(jnp.ones(3), jnp.zeros(3)), None, jnp.asarray(x), True)
    expected = x.astype(np.float64).var(axis=0, ddof=1)
    np.testing.assert_allclose(variables["batch_stats"]["var"], expected, rtol=1e-3)
    np.testing.assert_allclose(np.std(y, axis=0), 1.0, rtol=1e-3)


def test_axis_name_averages_statistics_across_devices():
    # vmap with an axis name stands in for devices: the statistics are the global batch's.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, 3)), jnp.float32)
    variables = _variables(jnp.ones(3), jnp.zeros(3))
    _, apply_fn = mx.transform(mx.BatchNorm(3, momentum=0.5, axis_name="devices"))
    y, new = jax.vmap(lambda x: apply_fn(variables, None, x, True), axis_name="devices")(x)
    _, single_apply = mx.transform(mx.BatchNorm(3, momentum=0.5))
    y_global, new_global = single_apply(variables, None, x.reshape(20, 3), True)
    # Statistics of 20 samples summed per device then across, or at once: other orders. A mean
    # may cancel to near 0, so the bound scales with the terms summed (x, and its squares).
    assert_close(y.reshape(20, 3), y_global, n=24)
    terms = {"mean": np.abs(x).max(), "var": (2 * np.abs(x).max()) ** 2}
    for name in ("mean", "var"):
        per_device, expected = new["batch_stats"][name], new_global["batch_stats"][name]
        assert_close(per_device, np.broadcast_to(expected, (4, 3)), n=24, scale=terms[name])


def test_variables_without_scale_or_bias():
    shapes = jax.eval_shape(mx.transform(mx.BatchNorm(4, use_scale=False))[0], jax.random.key(0))
    assert jax.tree.map(jnp.shape, shapes) == {
        "params": {"bias": (4,)},
        "batch_stats": {"mean": (4,), "var": (4,)},
    }
    init_fn, apply_fn = mx.transform(mx.BatchNorm(3, use_scale=False, use_bias=False))
    variables = init_fn(jax.random.key(0))
    assert not variables.get("params")
    y, _ = apply_fn(variables, None, jnp.arange(6.0).reshape(2, 3), True)
    np.testing.assert_allclose(y, np.array([[-1.0] * 3, [1.0] * 3]), atol=1e-4)


def test_initial_variables():
    variables = mx.transform(mx.BatchNorm(3))[0](jax.random.key(0))
    expected = {
        "params": {"scale": np.ones(3), "bias": np.zeros(3)},
        "batch_stats": {"mean": np.zeros(3), "var": np.ones(3)},
    }
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_computation_dtype():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
    _, apply_fn = mx.transform(mx.BatchNorm(3, dtype=jnp.bfloat16))
    y, variables = apply_fn(_variables(jnp.ones(3), jnp.zeros(3)), None, x, True)
    assert y.dtype == jnp.bfloat16
    assert variables["batch_stats"]["var"].dtype == jnp.float32
    _, reference = mx.transform(mx.BatchNorm(3))
    expected, _ = reference(_variables(jnp.ones(3), jnp.zeros(3)), None, x, True)
    np.testing.assert_allclose(y.astype(jnp.float32), expected, atol=2e-2, rtol=1e-2)


def test_param_dtype():
    init_fn, apply_fn = mx.transform(mx.BatchNorm(3, param_dtype=jnp.bfloat16))
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    assert shapes["params"]["scale"].dtype == jnp.bfloat16
    assert shapes["batch_stats"]["mean"].dtype == jnp.float32  # statistics stay accurate
    variables = {
        "params": {"scale": jnp.ones(3, jnp.bfloat16), "bias": jnp.zeros(3, jnp.bfloat16)},
        "batch_stats": INITIAL_STATS,
    }
    x = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3)
    y, new = apply_fn(variables, None, x, True)
    assert y.dtype == jnp.bfloat16 and new["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(y.astype(jnp.float32), np.array([[-1.0] * 3, [1.0] * 3]), atol=1e-2)
    y32, _ = apply_fn(variables, None, x.astype(jnp.float32), True)
    assert y32.dtype == jnp.float32  # dtype=None: float32 input and bfloat16 scale promote


class _Net(mx.Module):
    def __init__(self):
        self.bn = mx.BatchNorm(3)

    def __call__(self, x, is_training):
        return self.bn(x, is_training)


@pytest.mark.parametrize(
    "shape, is_training, expected",
    [
        ((4, 5), True, ["size=3", "(4, 5)", "features last"]),
        ((), False, ["size=3", "()"]),
        ((1, 3), True, ["more than one value", "(1, 3)", "is_training=False"]),
    ],
)
def test_bad_input_shape(shape, is_training, expected):
    _, apply_fn = mx.transform(_Net())
    variables = {
        "params": {"bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}},
        "batch_stats": {"bn": INITIAL_STATS},
    }
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(variables, None, jnp.ones(shape), is_training)
    assert "BatchNorm at 'bn'" in str(info.value)
    for text in expected:
        assert text in str(info.value)


def test_single_example_is_fine_in_evaluation():
    _, apply_fn = mx.transform(mx.BatchNorm(3))
    y, _ = apply_fn(_variables(jnp.ones(3), jnp.zeros(3)), None, jnp.ones((1, 3)), False)
    assert y.shape == (1, 3)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, "0.9", float("nan")])
def test_bad_momentum(momentum):
    with pytest.raises(mx.errors.LayerConfigError, match="1 - PyTorch's value"):
        mx.BatchNorm(3, momentum=momentum)


def test_bad_size():
    with pytest.raises(mx.errors.LayerConfigError, match="positive int"):
        mx.BatchNorm(0)


def test_repr():
    assert mx.BatchNorm(3).extra_repr() == "size=3, momentum=0.99, epsilon=1e-05"
    assert "axis_name='batch'" in mx.BatchNorm(3, axis_name="batch").extra_repr()


# LayerNorm, RMSNorm, GroupNorm, InstanceNorm: the statistics of each example.

# PyTorch's channels-first input of rank n -> our channels-last layout.
TO_CHANNELS_LAST = {2: None, 3: (0, 2, 1), 4: (0, 2, 3, 1)}


def _params_fn(layer):
    """``fn(x, *params)``: the layer applied with its parameters (``scale``, then ``bias``,
    those it has), a function of arrays for ``jax.vjp``."""
    _, apply_fn = mx.transform(layer)
    names = [name for name in ("scale", "bias") if getattr(layer, name, None) is not None]

    def run(x, *params):
        variables = {"params": dict(zip(names, params, strict=True))} if names else {}
        return apply_fn(variables, None, x)[0]

    return run


def _torch_fn(torch, module):
    """``fn(x, *params)``: the torch module called with its ``weight`` (then ``bias``) replaced
    by ``params``, those it has."""

    def run(x, *params):
        replaced = dict(zip(("weight", "bias"), params, strict=False))
        return torch.func.functional_call(module, replaced, (x,))

    return run


def _initial_params(layer):
    """The layer's initial parameters in ``_params_fn`` order."""
    params = mx.transform(layer)[0](jax.random.key(0)).get("params", {})
    return [params[name] for name in ("scale", "bias") if name in params]


def _affine(torch, affine, size=5):
    return [torch.rand(size) + 0.5, torch.randn(size)] if affine else []


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)], ids=["no-batch", "2-batch-axes"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_matches_torch(torch, assert_matches_torch, shape, affine):
    layer = LayerNorm(5, epsilon=1e-3, use_scale=affine, use_bias=affine)
    params = _affine(torch, affine)
    assert_matches_torch(
        _params_fn(layer),
        _torch_fn(torch, torch.nn.LayerNorm(5, eps=1e-3, elementwise_affine=affine)),
        [torch.randn(*shape) * 2 + 1, *params],
        layouts=[None] * (1 + len(params)),
    )


@pytest.mark.parametrize("use_scale", [True, False])
def test_rms_norm_matches_torch(torch, assert_matches_torch, use_scale):
    reference = torch.nn.RMSNorm(5, eps=1e-6, elementwise_affine=use_scale)
    params = [torch.rand(5) + 0.5] if use_scale else []
    assert_matches_torch(
        _params_fn(RMSNorm(5, use_scale=use_scale)),
        _torch_fn(torch, reference),
        [torch.randn(2, 3, 5) + 0.5, *params],
        layouts=[None] * (1 + len(params)),
    )


@pytest.mark.parametrize(
    "torch_shape, num_groups",
    [((4, 6), 3), ((2, 6, 5), 3), ((2, 6, 3, 4), 2), ((2, 6, 3, 4), 1), ((2, 6, 3, 4), 6)],
    ids=["0d", "1d", "2d", "2d-one-group", "2d-group-per-channel"],
)
def test_group_norm_matches_torch(torch, assert_matches_torch, torch_shape, num_groups):
    reference = torch.nn.GroupNorm(num_groups, 6, eps=1e-3)
    layout = TO_CHANNELS_LAST[len(torch_shape)]
    assert_matches_torch(
        _params_fn(GroupNorm(num_groups, 6, epsilon=1e-3)),
        _torch_fn(torch, reference),
        [torch.randn(*torch_shape) * 2 + 1, *_affine(torch, True, 6)],
        layouts=[layout, None, None],
        out_layout=layout,
    )


@pytest.mark.parametrize("torch_shape", [(2, 3, 5), (2, 3, 4, 5)], ids=["1d", "2d"])
def test_instance_norm_matches_torch_affine(torch, assert_matches_torch, torch_shape):
    module = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d}[len(torch_shape)]
    reference = module(3, eps=1e-3, affine=True)
    layout = TO_CHANNELS_LAST[len(torch_shape)]
    assert_matches_torch(
        _params_fn(InstanceNorm(3, epsilon=1e-3)),
        _torch_fn(torch, reference),
        [torch.randn(*torch_shape) * 2 + 1, *_affine(torch, True, 3)],
        layouts=[layout, None, None],
        out_layout=layout,
    )


@pytest.mark.parametrize("torch_shape", [(2, 3, 5), (2, 3, 4, 5)], ids=["1d", "2d"])
@pytest.mark.parametrize("affine", [False, True], ids=["no-params", "initial-params"])
def test_instance_norm_matches_torch_default(torch, assert_matches_torch, torch_shape, affine):
    # PyTorch's default is affine=False: ours without parameters, or with its initial ones.
    module = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d}[len(torch_shape)]
    layer = InstanceNorm(3, use_scale=affine, use_bias=affine)
    fn, params = _params_fn(layer), _initial_params(layer)
    layout = TO_CHANNELS_LAST[len(torch_shape)]
    assert_matches_torch(
        lambda x: fn(x, *params),
        module(3),
        [torch.randn(*torch_shape) * 2 + 1],
        layouts=[layout],
        out_layout=layout,
    )


@pytest.mark.parametrize(
    "layer", [GroupNorm(2, 4), InstanceNorm(4)], ids=["GroupNorm", "InstanceNorm"]
)
def test_first_axis_is_the_only_batch_axis(layer):
    # (a, b, h, size) is batch a with spatial axes (b, h), as (a, b * h, size).
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 4)), jnp.float32)
    fn, params = _params_fn(layer), _initial_params(layer)
    y = fn(x, *params)
    pooled = fn(x.reshape(2, 15, 4), *params).reshape(y.shape)
    assert_close(y, pooled, n=32)  # statistics of 30 values, reduced in other orders
    assert not np.allclose(y[:, 0], fn(x[:, 0], *params), atol=1e-2)


NORMS = {
    "LayerNorm": lambda **kw: LayerNorm(3, **kw),
    "RMSNorm": lambda **kw: RMSNorm(3, **kw),
    "GroupNorm": lambda **kw: GroupNorm(1, 3, **kw),
    "InstanceNorm": lambda **kw: InstanceNorm(3, **kw),
}


@pytest.mark.parametrize(
    "make, shape, axes",
    [(LayerNorm, (2, 32), (1,)), (InstanceNorm, (2, 32, 4), (1,)), (GroupNorm, (2, 8, 4), (1, 2))],
    ids=["LayerNorm", "InstanceNorm", "GroupNorm"],
)
def test_variance_is_two_pass_per_example(make, shape, axes):
    # Mean 1000, spread 0.01: E[x^2] - E[x]^2 in float32 loses every digit of the variance.
    size_args = (1, shape[-1]) if make is GroupNorm else (shape[-1],)
    layer = make(*size_args, epsilon=0.0, use_scale=False, use_bias=False)
    x = 1000 + 0.01 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = _params_fn(layer)(jnp.asarray(x))
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(axes, keepdims=True)) / x64.std(axes, keepdims=True)
    # The float32 mean of values near 1000 is itself off by ~1e-4, ~1e-2 once divided by the
    # spread; one pass would be off by ~1e4.
    np.testing.assert_allclose(y, expected, atol=5e-2)


@pytest.mark.parametrize("make", NORMS.values(), ids=NORMS.keys())
def test_norm_computation_dtype(make):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)) + 3, jnp.float32)
    layer = make(dtype=jnp.bfloat16)
    init_fn, apply_fn = mx.transform(layer)
    variables = init_fn(jax.random.key(0))
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    y, _ = apply_fn(variables, None, x)
    assert y.dtype == jnp.bfloat16
    expected, _ = mx.transform(make())[1](variables, None, x)
    np.testing.assert_allclose(y.astype(jnp.float32), expected, atol=3e-2, rtol=1e-2)
    grads = jax.grad(lambda v: apply_fn(v, None, x)[0].astype(jnp.float32).sum())(variables)
    assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("make", NORMS.values(), ids=NORMS.keys())
def test_norm_param_dtype_and_float32_statistics(make, all_equations):
    init_fn, apply_fn = mx.transform(make(param_dtype=jnp.bfloat16))
    variables = init_fn(jax.random.key(0))
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    x16 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.bfloat16)
    y, _ = apply_fn(variables, None, x16)
    assert y.dtype == jnp.bfloat16
    # The statistics are sums in float32 even for a bfloat16 computation.
    jaxpr = jax.make_jaxpr(lambda v, x: apply_fn(v, None, x)[0])(variables, x16)
    sums = [e for e in all_equations(jaxpr.jaxpr) if e.primitive.name == "reduce_sum"]
    assert sums and {e.invars[0].aval.dtype for e in sums} == {jnp.dtype(jnp.float32)}
    # dtype=None with a float32 input: promoted to float32.
    y32, _ = apply_fn(variables, None, x16.astype(jnp.float32))
    assert y32.dtype == jnp.float32


@pytest.mark.parametrize(
    "layer, expected",
    [
        (LayerNorm(4), {"scale": 1.0, "bias": 0.0}),
        (LayerNorm(4, use_scale=False), {"bias": 0.0}),
        (RMSNorm(4), {"scale": 1.0}),
        (RMSNorm(4, use_scale=False), {}),
        (GroupNorm(2, 4, use_bias=False), {"scale": 1.0}),
        (InstanceNorm(4, scale_init=mx.initializers.constant(0.5)), {"scale": 0.5, "bias": 0.0}),
    ],
)
def test_norm_variables(layer, expected):
    variables = mx.transform(layer)[0](jax.random.key(0))
    assert jax.tree.map(jnp.shape, variables) == (
        {"params": {name: (4,) for name in expected}} if expected else {}
    )
    for name, value in expected.items():
        np.testing.assert_array_equal(variables["params"][name], np.full(4, value))


class _Wrapped(mx.Module):
    def __init__(self, layer):
        self.norm = layer

    def __call__(self, x):
        return self.norm(x)


@pytest.mark.parametrize(
    "make, shape, expected",
    [
        (lambda: LayerNorm(4), (2, 5), ["(..., 4)", "size=4", "(2, 5)", "features last"]),
        (lambda: LayerNorm(4), (), ["(..., 4)", "()"]),
        (lambda: RMSNorm(4), (2, 3), ["(..., 4)", "size=4", "(2, 3)"]),
        (lambda: GroupNorm(2, 4), (2, 3, 5), ["(batch, *spatial, 4)", "(2, 3, 5)"]),
        (lambda: GroupNorm(2, 4), (4,), ["(2+ axes)", "(4,)", "x[None]"]),
        (lambda: InstanceNorm(4), (2, 3, 5), ["(batch, *spatial, 4)", "size=4", "(2, 3, 5)"]),
        (lambda: InstanceNorm(4), (2, 4), ["at least one spatial axis", "(2, 4)", "x[None]"]),
    ],
    ids=["ln-size", "ln-scalar", "rms-size", "gn-size", "gn-axes", "in-size", "in-axes"],
)
def test_norm_bad_input_shape(make, shape, expected):
    init_fn, apply_fn = mx.transform(_Wrapped(make()))
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(init_fn(jax.random.key(0)), None, jnp.ones(shape))
    message = str(info.value)
    assert f"{type(make()).__name__} at 'norm'" in message
    for text in expected:
        assert text in message


def test_group_norm_bad_num_groups():
    with pytest.raises(mx.errors.LayerConfigError) as info:
        GroupNorm(3, 8)
    assert "num_groups=3" in str(info.value) and "size=8" in str(info.value)
    assert "[1, 2, 4, 8]" in str(info.value)
    with pytest.raises(mx.errors.LayerConfigError, match="`num_groups` must be a positive int"):
        GroupNorm(0, 8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LayerNorm(0),
        lambda: RMSNorm(-1),
        lambda: GroupNorm(2, 2.5),
        lambda: InstanceNorm(True),
    ],
)
def test_norm_bad_size(make):
    with pytest.raises(mx.errors.LayerConfigError, match="`size` must be a positive int"):
        make()


def test_norm_repr():
    assert LayerNorm(4).extra_repr() == "size=4, epsilon=1e-05"
    assert LayerNorm(4, use_bias=False).extra_repr() == "size=4, epsilon=1e-05, use_bias=False"
    assert RMSNorm(4).extra_repr() == "size=4, epsilon=1e-06"
    assert RMSNorm(4, use_scale=False).extra_repr() == "size=4, epsilon=1e-06, use_scale=False"
    assert GroupNorm(2, 4).extra_repr() == "num_groups=2, size=4, epsilon=1e-05"
    assert (
        InstanceNorm(4, epsilon=1e-3, use_scale=False, use_bias=False).extra_repr()
        == "size=4, epsilon=0.001, use_scale=False, use_bias=False"
    )
    assert "num_groups=2, size=4, epsilon=1e-05" in repr(GroupNorm(2, 4))


@pytest.mark.parametrize(
    "make",
    [
        lambda epsilon: mx.BatchNorm(3, epsilon=epsilon),
        lambda epsilon: LayerNorm(3, epsilon=epsilon),
        lambda epsilon: RMSNorm(3, epsilon=epsilon),
        lambda epsilon: GroupNorm(1, 3, epsilon=epsilon),
        lambda epsilon: InstanceNorm(3, epsilon=epsilon),
    ],
)
@pytest.mark.parametrize("epsilon", [-1e-5, float("inf"), "1e-5", None])
def test_bad_epsilon(make, epsilon):
    with pytest.raises(mx.errors.LayerConfigError) as info:
        make(epsilon)
    message = str(info.value)
    layer = message.split(":")[0]
    assert layer in {"BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"}
    assert "`epsilon` must be a finite number >= 0" in message and repr(epsilon) in message
    assert make(0).epsilon == 0.0  # zero is allowed: exact whenever the variance is positive


@pytest.mark.parametrize("layer", [LayerNorm, InstanceNorm, GroupNorm, mx.BatchNorm, RMSNorm])
def test_norms_show_their_arguments(layer):
    # LayerNorm and InstanceNorm inherit the shared constructor: explicit keywords, each one
    # documented.
    parameters = inspect.signature(layer).parameters
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters.values())
    doc = inspect.getdoc(layer)
    for name in parameters:
        assert f"\n    {name}: " in doc
    assert "{norm_args}" not in doc


def _plain_norm(name, x, scale, bias, epsilon):
    """The normalizations of NORMS in plain JAX (autodiff's own derivatives), on (2, 4, 3)."""
    axes = {"LayerNorm": (2,), "RMSNorm": (2,), "GroupNorm": (1, 2), "InstanceNorm": (1,)}[name]
    if name == "RMSNorm":
        return x * jax.lax.rsqrt(jnp.mean(x * x, axes, keepdims=True) + epsilon) * scale
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


@pytest.mark.parametrize("name", NORMS)
def test_norm_derivatives_of_every_order_and_mode(name):
    # The input gradient passes through an optimization barrier (see the next test): reverse,
    # forward and second-order derivatives, and vmap of them, are still those of the formula.
    layer = NORMS[name]()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 3)) * 2 + 1, jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(3), jnp.float32) for _ in range(2))
    params = {"scale": scale} if name == "RMSNorm" else {"scale": scale, "bias": bias}
    scale, bias = scale.reshape(1, 1, 3), bias.reshape(1, 1, 3)  # rank promotion is "raise"
    apply_fn = mx.transform(layer)[1]
    weights = jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32)

    def ours(x):
        return jnp.sum(apply_fn({"params": params}, None, x)[0] * weights)

    def plain(x):
        return jnp.sum(_plain_norm(name, x, scale, bias, layer.epsilon) * weights)

    tangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    xs = jnp.stack([x, 2 * x - 1])
    for derivative, argument in (
        (jax.grad, x),
        (lambda f: lambda x: jax.jvp(f, (x,), (tangent,))[1], x),
        (lambda f: lambda x: jax.jvp(jax.grad(f), (x,), (tangent,))[1], x),  # Hessian-vector
        (jax.hessian, x),  # forward over reverse
        (lambda f: jax.jacrev(jax.grad(f)), x),  # reverse over reverse
        (lambda f: jax.vmap(jax.grad(f)), xs),  # a batch of gradients
    ):
        # Jitted: dispatched op by op, the Hessians take seconds. Second derivatives sum ~24
        # products of terms of size ~1/std^3: a few hundred ulps.
        ours_d, plain_d = (jax.jit(derivative(f))(argument) for f in (ours, plain))
        assert_close(ours_d, plain_d, n=256)


def test_norm_input_gradient_is_materialized_once_per_layer():
    # In a residual stack, each normalization's input gradient is one array (an
    # optimization_barrier in the backward pass), so that XLA does not fuse the chain of
    # gradient additions along the skip path into every consumer (cost quadratic in depth).
    # The forward pass has no barrier.
    class Stack(mx.Module):
        def __init__(self):
            super().__init__()
            self.norms = [LayerNorm(8), RMSNorm(8), GroupNorm(2, 8), InstanceNorm(8)]
            self.dense = [mx.Dense(8, 8) for _ in self.norms]

        def __call__(self, x):
            for norm, dense in zip(self.norms, self.dense, strict=True):
                x = x + dense(norm(x))
            return x

    init_fn, apply_fn = mx.transform(Stack())
    variables = init_fn(jax.random.key(0))
    x = jnp.ones((2, 3, 8))

    def loss(v, x):
        return jnp.sum(apply_fn(v, None, x)[0] ** 2)

    def barriers(fn):
        return str(jax.make_jaxpr(fn)(variables, x)).count("optimization_barrier")

    assert barriers(loss) == 0
    assert barriers(jax.grad(loss, argnums=(0, 1))) == 4
    assert barriers(jax.grad(loss)) == 3  # the first input's gradient is not asked for
