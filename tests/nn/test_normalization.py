"""BatchNorm: PyTorch parity in training and evaluation, running statistics, cross-device
statistics, numerical safety, dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx

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
    np.testing.assert_allclose(y.reshape(20, 3), y_global, atol=1e-5)
    for name in ("mean", "var"):
        per_device, expected = new["batch_stats"][name], new_global["batch_stats"][name]
        np.testing.assert_allclose(per_device, np.broadcast_to(expected, (4, 3)), rtol=1e-5)


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


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_bad_momentum(momentum):
    with pytest.raises(mx.errors.LayerConfigError, match="1 - PyTorch's value"):
        mx.BatchNorm(3, momentum=momentum)


def test_bad_size():
    with pytest.raises(mx.errors.LayerConfigError, match="positive int"):
        mx.BatchNorm(0)


def test_repr():
    assert mx.BatchNorm(3).extra_repr() == "size=3, momentum=0.99, epsilon=1e-05"
    assert "axis_name='batch'" in mx.BatchNorm(3, axis_name="batch").extra_repr()
