"""Tests of metoryx/nn/reparametrization.py: WeightNorm and SpectralNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close, assert_trees_close  # tests/_tolerance.py

import metoryx as mx
from conftest import FORWARD_TOL, GRAD_TOL
from metoryx import errors
from metoryx.interop.torch import load_state_dict, to_state_dict
from metoryx.layout import TorchConversion
from metoryx.nn.reparametrization import SpectralNorm, WeightNorm

NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)

# (name, torch module factory, our layer, torch input shape, input permutation to ours)
LAYERS = [
    ("Linear", lambda nn: nn.Linear(3, 4), lambda: mx.Dense(3, 4), (5, 3), None),
    (
        "Conv2d",
        lambda nn: nn.Conv2d(4, 6, 3, padding=1, groups=2),
        lambda: mx.Conv(4, 6, (3, 3), padding=1, groups=2),
        (2, 4, 5, 5),
        NCHW_TO_NHWC,
    ),
    (
        "ConvTranspose2d",
        lambda nn: nn.ConvTranspose2d(2, 3, 3, stride=2),
        lambda: mx.ConvTranspose(2, 3, (3, 3), strides=2),
        (2, 2, 3, 3),
        NCHW_TO_NHWC,
    ),
]


def permuted(a, perm):
    return a if perm is None else np.transpose(a, perm)


def inverse(perm):
    return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def forward_backward(model, **kwargs):
    """``fn(variables, x, cotangent) -> (y, (param_grads, x_grad), new_variables)`` of
    ``model`` called with ``kwargs``: one compiled program for all the steps of a test."""
    _, apply_fn = mx.transform(model)

    @jax.jit
    def fn(variables, x, cotangent):
        def run(params, x):
            return apply_fn({**variables, "params": params}, None, x, **kwargs)

        y, vjp, new_variables = jax.vjp(run, variables["params"], x, has_aux=True)
        return y, vjp(cotangent), new_variables

    return fn


def step_both(torch, model, fn, torch_module, variables, x, perm):
    """One forward and backward pass of both models on ``x`` (a torch tensor), ours by
    ``fn = forward_backward(model, ...)``; compares the outputs and the gradients with respect
    to the input and every torch parameter. Returns our new variables."""
    x_torch = x.clone().requires_grad_(True)
    torch_module.zero_grad()
    y_torch = torch_module(x_torch)
    out_shape = permuted(y_torch.detach().numpy(), perm).shape
    cotangent = np.random.default_rng(0).standard_normal(out_shape).astype(np.float32)
    x_ours = jnp.asarray(permuted(x.numpy(), perm))
    y, (param_grads, x_grad), new_variables = fn(variables, x_ours, cotangent)
    np.testing.assert_allclose(
        y, permuted(y_torch.detach().numpy(), perm), atol=FORWARD_TOL, rtol=FORWARD_TOL
    )
    (y_torch * torch.from_numpy(permuted(cotangent, inverse(perm)))).sum().backward()
    np.testing.assert_allclose(
        x_grad, permuted(x_torch.grad.numpy(), perm), atol=GRAD_TOL, rtol=GRAD_TOL
    )
    grads = to_state_dict(model, {**variables, "params": param_grads})
    for name, parameter in torch_module.named_parameters():
        np.testing.assert_allclose(
            grads[name].numpy(), parameter.grad.numpy(), atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name
        )
    return new_variables


@pytest.mark.parametrize(("name", "make_torch", "make_ours", "shape", "perm"), LAYERS)
def test_weight_norm_matches_torch(torch, name, make_torch, make_ours, shape, perm):
    from torch.nn.utils.parametrizations import weight_norm

    # PyTorch's ConvTranspose weight has its output channels on axis 1.
    torch_module = weight_norm(make_torch(torch.nn), dim=1 if "Transpose" in name else 0)
    with torch.no_grad():  # g away from ||v||, where it starts
        g = torch_module.parametrizations.weight.original0
        g.mul_(torch.rand(g.shape) + 0.5)
    model = WeightNorm(make_ours())
    variables = load_state_dict(model, torch_module.state_dict())
    x = torch.randn(shape)
    step_both(torch, model, forward_backward(model), torch_module, variables, x, perm)


def test_weight_norm_of_conv_transpose_over_its_input_axis_matches_torch(torch):
    from torch.nn.utils.parametrizations import weight_norm

    _, make_torch, make_ours, shape, perm = LAYERS[2]
    torch_module = weight_norm(make_torch(torch.nn))  # dim=0: PyTorch's input axis
    model = WeightNorm(make_ours(), axis=-2)
    variables = load_state_dict(model, torch_module.state_dict())
    fn = forward_backward(model)
    step_both(torch, model, fn, torch_module, variables, torch.randn(shape), perm)


def test_weight_norm_over_the_whole_weight_matches_torch(torch):
    from torch.nn.utils.parametrizations import weight_norm

    torch_module = weight_norm(torch.nn.Linear(3, 4), dim=None)
    with torch.no_grad():
        torch_module.parametrizations.weight.original0.fill_(2.5)
    model = WeightNorm(mx.Dense(3, 4), axis=())
    variables = load_state_dict(model, torch_module.state_dict())
    assert variables["params"]["scale"].shape == ()
    fn = forward_backward(model)
    step_both(torch, model, fn, torch_module, variables, torch.randn(2, 3), None)


@pytest.mark.parametrize(("name", "make_torch", "make_ours", "shape", "perm"), LAYERS)
def test_spectral_norm_matches_torch_in_training_and_evaluation(
    torch, name, make_torch, make_ours, shape, perm
):
    from torch.nn.utils.parametrizations import spectral_norm

    torch_module = spectral_norm(make_torch(torch.nn))
    model = SpectralNorm(make_ours())
    variables = load_state_dict(model, torch_module.state_dict())
    buffers = torch_module.parametrizations.weight[0]
    train = forward_backward(model, is_training=True)
    for _ in range(3):
        variables = step_both(
            torch, model, train, torch_module, variables, torch.randn(shape), perm
        )
        stats = to_state_dict(model, variables)
        for vector in ("_u", "_v"):
            np.testing.assert_allclose(
                stats[f"parametrizations.weight.0.{vector}"].numpy(),
                getattr(buffers, vector).numpy(),
                atol=FORWARD_TOL,
            )
    torch_module.eval()
    evaluate = forward_backward(model, is_training=False)
    x = torch.randn(shape)
    new_variables = step_both(torch, model, evaluate, torch_module, variables, x, perm)
    jax.tree.map(np.testing.assert_array_equal, new_variables, variables)


def test_variables_and_repr():
    model = WeightNorm(mx.Conv(2, 4, (3, 3), param_dtype=jnp.bfloat16))
    shapes = jax.eval_shape(mx.init(model), jax.random.key(0))
    assert jax.tree.map(lambda s: (s.shape, s.dtype.name), shapes) == {
        "params": {
            "layer": {"kernel": ((3, 3, 2, 4), "bfloat16"), "bias": ((4,), "bfloat16")},
            "scale": ((4,), "bfloat16"),
        }
    }
    assert "WeightNorm(\n  name='kernel', axis=(3,)" in repr(model)
    model = SpectralNorm(mx.Dense(3, 5, param_dtype=jnp.bfloat16), n_power_iterations=2)
    shapes = jax.eval_shape(mx.init(model), jax.random.key(0))
    assert jax.tree.map(lambda s: (s.shape, s.dtype.name), shapes["spectral_stats"]) == {
        "u": ((5,), "float32"),
        "v": ((3,), "float32"),
    }
    assert "axis=1, n_power_iterations=2, epsilon=1e-12" in repr(model)


def test_weight_norm_gives_each_output_the_norm_of_its_scale():
    model = WeightNorm(mx.Dense(4, 3, use_bias=False))
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    kernel = variables["params"]["layer"]["kernel"]
    # Starts at unit norms: close to the LeCun-normal kernel's own norms.
    start, _ = apply_fn(variables, None, jnp.eye(4))
    # Norms of 4 entries, a division and a product: ~10 roundings (tests/_tolerance.py).
    assert_close(jnp.linalg.norm(start, axis=0), jnp.ones(3), n=10)
    assert_close(start, kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True), n=10)
    variables["params"]["scale"] = jnp.array([0.5, 2.0, 3.0])
    weight, _ = apply_fn(variables, None, jnp.eye(4))
    assert_close(jnp.linalg.norm(weight, axis=0), [0.5, 2.0, 3.0], n=10)


@pytest.mark.parametrize("wrapper", [WeightNorm, SpectralNorm])
def test_embed_rows_and_attend_through_reparametrized(wrapper):
    kwargs = {} if wrapper is WeightNorm else {"is_training": False}

    class TiedLM(mx.Module):
        def __init__(self):
            self.embed = wrapper(mx.Embed(6, 4))

        def __call__(self, ids):
            with self.embed.reparametrized(**kwargs) as embed:
                return embed(ids), embed.attend(jnp.eye(4)).T

    init_fn, apply_fn = mx.transform(TiedLM())
    variables = init_fn(jax.random.key(0))
    table = variables["params"]["embed"]["layer"]["embedding"]
    (vectors, weight), _ = apply_fn(variables, None, jnp.array([0, 5]))
    if wrapper is WeightNorm:  # one unit-norm row per id
        assert_close(weight, table / jnp.linalg.norm(table, axis=1, keepdims=True), n=10)
    else:  # sigma: two short dots, in another order than the layer's
        stats = variables["spectral_stats"]["embed"]
        assert_close(weight, table / (stats["u"] @ table @ stats["v"]), n=16)
    np.testing.assert_array_equal(vectors, weight[jnp.array([0, 5])])


def test_spectral_norm_converges_to_the_largest_singular_value():
    model = SpectralNorm(mx.Conv(3, 5, (2, 2), padding="VALID", use_bias=False))
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    x = jnp.ones((1, 2, 2, 3))

    @jax.jit
    def train(variables):
        def step(variables, _):
            return apply_fn(variables, None, x, is_training=True)[1], None

        return jax.lax.scan(step, variables, length=30)[0]

    variables = train(variables)
    kernel = variables["params"]["layer"]["kernel"]
    sigma = np.linalg.norm(np.asarray(kernel).reshape(-1, 5), ord=2)
    y, new_variables = jax.jit(apply_fn, static_argnames="is_training")(
        variables, None, x, is_training=False
    )
    np.testing.assert_allclose(
        y.reshape(5), x.reshape(12) @ kernel.reshape(12, 5) / sigma, rtol=1e-5
    )
    assert new_variables["spectral_stats"] is not variables["spectral_stats"]
    jax.tree.map(np.testing.assert_array_equal, new_variables, variables)


def test_spectral_norm_gradients_skip_the_vectors():
    init_fn, apply_fn = mx.transform(SpectralNorm(mx.Dense(3, 2)))
    variables = init_fn(jax.random.key(0))

    @jax.jit
    def grads(variables):
        def loss(variables, is_training):
            return apply_fn(variables, None, jnp.ones((2, 3)), is_training=is_training)[0].sum()

        return [jax.grad(loss)(variables, is_training) for is_training in (True, False)]

    for grad in grads(variables):
        jax.tree.map(np.testing.assert_array_equal, grad["spectral_stats"], {"u": 0.0, "v": 0.0})
        assert float(jnp.abs(grad["params"]["layer"]["kernel"]).sum()) > 0


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [(WeightNorm(mx.Dense(3, 2)), {}), (SpectralNorm(mx.Dense(3, 2)), {"is_training": True})],
    ids=["WeightNorm", "SpectralNorm"],
)
def test_jit_grad_and_vmap(model, kwargs):
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))

    def run(variables, x):
        return apply_fn(variables, None, x, **kwargs)

    eager = run(variables, x)
    jitted = jax.jit(run)(variables, x)
    # Eager, jitted and batched programs round in their own orders (a norm or power iteration
    # and a 3-term dot): ~16 roundings.
    assert_trees_close(eager, jitted, n=16)
    batched = jax.vmap(lambda x: run(variables, x)[0])(x)
    assert_close(batched, eager[0], n=16)
    grads = jax.jit(jax.grad(lambda p: run({**variables, "params": p}, x)[0].sum()))(
        variables["params"]
    )
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_bfloat16_weights():
    def apply(param_dtype, dtype):
        init_fn, apply_fn = mx.transform(WeightNorm(mx.Dense(3, 2, param_dtype=param_dtype)))
        variables = jax.tree.map(lambda a: a.astype(param_dtype), init_fn(jax.random.key(0)))
        return apply_fn(variables, None, jnp.ones((1, 3), dtype))[0]

    y = apply(jnp.bfloat16, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        y.astype(jnp.float32), apply(jnp.float32, jnp.float32), rtol=2e-2, atol=2e-2
    )


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [WeightNorm, SpectralNorm])
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda w: w(mx.relu), r"`layer` must be a module.*\(mx\.Dense\(3, 4\)\)"),
        (lambda w: w(mx.LayerNorm(3)), r"no `kernel` or `embedding`.*\['scale', 'bias'\].*name="),
        (lambda w: w(mx.Dense(3, 4), name="in_size"), r"'in_size' is not a Parameter.*'kernel'"),
        (lambda w: w(mx.Dense(3, 4), axis=2), r"axis=2 is not an axis.*\(3, 4\).*\[-2, 1\]"),
        (lambda w: w(mx.Dense(3, 4), axis=True), r"axis=True is not an axis"),
        (lambda w: w(mx.Dense(3, 4), axis=0.0), r"axis=0.0 is not an axis"),
        (lambda w: w(mx.Dense(3, 4), name=["kernel"]), r"\['kernel'\] is not a Parameter"),
        (lambda w: w(mx.Dense(3, 4), name=np.array(["a", "b"])), r"is not a Parameter"),
        (lambda w: w(mx.Einsum("ab,bcd->acd", (2, 3, 4)), name="kernel", axis=-4), "axis=-4"),
    ],
)
def test_bad_configurations(wrapper, make, match):
    with pytest.raises(errors.LayerConfigError, match=match) as info:
        make(wrapper)
    assert str(info.value).startswith(wrapper.__name__)


@pytest.mark.parametrize("epsilon", [-1e-12, float("nan"), "1e-12"])
def test_spectral_norm_bad_epsilon(epsilon):
    with pytest.raises(errors.LayerConfigError, match="SpectralNorm: `epsilon` must be a finite"):
        SpectralNorm(mx.Dense(3, 4), epsilon=epsilon)


class Table(mx.Module):
    """A module whose weight is neither `kernel` nor `embedding`, in PyTorch's (out, in)."""

    def __init__(self):
        self.weight = mx.Parameter(mx.initializers.ones, (2, 3))

    def __call__(self, x):
        return x @ self.weight.T


def test_other_weights_need_an_axis():
    with pytest.raises(errors.LayerConfigError, match=r"known only for `kernel`.*axis=0"):
        WeightNorm(Table(), name="weight")
    init_fn, apply_fn = mx.transform(WeightNorm(Table(), name="weight", axis=0))
    y, _ = apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((1, 3)))
    assert_close(y, jnp.full((1, 2), 3**0.5), n=10)  # a norm of 3 ones and a 3-term dot


def test_weight_norm_axes_must_be_distinct():
    with pytest.raises(errors.LayerConfigError, match=r"distinct axes of 'kernel'.*\(0, 2, -4\)"):
        WeightNorm(mx.Conv(2, 3, (3, 3)), axis=(0, 2, -4))


def test_spectral_norm_needs_a_matrix_and_iterations():
    with pytest.raises(errors.LayerConfigError, match=r"'scale' of LayerNorm has shape \(3,\)"):
        SpectralNorm(mx.LayerNorm(3), name="scale", axis=0)
    with pytest.raises(errors.LayerConfigError, match="n_power_iterations"):
        SpectralNorm(mx.Dense(3, 4), n_power_iterations=0)


def test_spectral_norm_needs_is_training():
    init_fn, apply_fn = mx.transform(SpectralNorm(mx.Dense(3, 4)))
    with pytest.raises(TypeError, match="is_training"):
        apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((1, 3)))


def test_grouped_conv_transpose_has_no_torch_counterpart():
    model = WeightNorm(mx.ConvTranspose(2, 4, (3, 3), groups=2))
    with pytest.raises(
        errors.LayerConfigError, match=r"'scale' do not lie along one axis of their own.*groups=1"
    ):
        load_state_dict(model, {})


def test_a_state_dict_of_another_dim_is_refused_by_name():
    # PyTorch's weight_norm of a ConvTranspose2d normalizes over its input axis by default.
    model = WeightNorm(mx.ConvTranspose(2, 3, (3, 3)))
    state_dict = {
        "parametrizations.weight.original0": np.ones((2, 1, 1, 1), np.float32),
        "parametrizations.weight.original1": np.ones((2, 3, 3, 3), np.float32),
        "bias": np.zeros(3, np.float32),
    }
    with pytest.raises(errors.VariableShapeError, match=r"original0: expected \(1, 3, 1, 1\)"):
        load_state_dict(model, state_dict)
    # The same number of values in another layout is refused too: (1, 3) is not (3, 1).
    model = WeightNorm(mx.Dense(3, 3))
    state_dict = {
        "parametrizations.weight.original0": np.ones((1, 3), np.float32),
        "parametrizations.weight.original1": np.ones((3, 3), np.float32),
        "bias": np.zeros(3, np.float32),
    }
    with pytest.raises(errors.VariableShapeError, match=r"original0: expected \(3, 1\)"):
        load_state_dict(model, state_dict)


class Fused(mx.Module):
    """A layer converting its kernel to PyTorch together with another variable."""

    def __init__(self):
        self.kernel = mx.Parameter(mx.initializers.ones, (2, 2))
        self.other = mx.Parameter(mx.initializers.ones, (2, 2))

    def torch_conversions(self):
        return [
            TorchConversion(
                ("both",),
                ("kernel", "other"),
                lambda a: (a[0], a[1]),
                lambda k, o: (np.stack([k, o]),),
            )
        ]


def test_a_weight_converted_with_others_has_no_torch_counterpart():
    with pytest.raises(errors.LayerConfigError, match=r"together with \['kernel', 'other'\]"):
        load_state_dict(SpectralNorm(Fused()), {})
