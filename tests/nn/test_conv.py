"""Conv and ConvTranspose: PyTorch parity in 1, 2 and 3 dimensions, batch axes, the jaxpr of a
hand-written convolution, dtypes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py
from jax import lax

import metoryx as mx
from metoryx.nn.conv import ConvTranspose


def _channels_last(ndim):
    return (0, *range(2, ndim + 2), 1)


def _kernel_layout(ndim):
    # PyTorch (out, in / groups, *kernel) -> ours (*kernel, in / groups, out).
    return (*range(2, ndim + 2), 1, 0)


# (in_size, out_size, kernel_size, input spatial shape, our options, PyTorch options)
CASES = {
    "1d-stride-padding": (4, 6, 3, (9,), dict(strides=2, padding=1), dict(stride=2, padding=1)),
    "2d-mixed": (
        4,
        6,
        (3, 2),
        (7, 6),
        dict(strides=(2, 1), padding=(1, 0), dilation=(1, 2)),
        dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    ),
    "2d-groups": (4, 6, 3, (5, 5), dict(groups=2, padding=1), dict(groups=2, padding=1)),
    "2d-depthwise": (4, 8, 3, (6, 6), dict(groups=4, padding="VALID"), dict(groups=4)),
    "2d-same": (3, 5, 3, (6, 6), dict(padding="SAME"), dict(padding="same")),
    "3d": (
        2,
        4,
        (2, 3, 2),
        (4, 5, 3),
        dict(strides=(1, 2, 1), padding=(1, 0, 1)),
        dict(stride=(1, 2, 1), padding=(1, 0, 1)),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch(torch, assert_matches_torch, kernel_bias_fn, case):
    in_size, out_size, kernel_size, spatial, ours, theirs = CASES[case]
    ndim = len(spatial)
    kernel = (kernel_size,) * ndim if isinstance(kernel_size, int) else kernel_size
    if ndim > 1 and isinstance(kernel_size, int):
        kernel_size = kernel
    groups = ours.get("groups", 1)
    conv = getattr(torch.nn.functional, f"conv{ndim}d")
    assert_matches_torch(
        kernel_bias_fn(mx.Conv(in_size, out_size, kernel_size, **ours)),
        lambda x, w, b: conv(x, w, b, **theirs),
        [
            torch.randn(2, in_size, *spatial),
            torch.randn(out_size, in_size // groups, *kernel),
            torch.randn(out_size),
        ],
        layouts=[_channels_last(ndim), _kernel_layout(ndim), None],
        out_layout=_channels_last(ndim),
    )


def test_asymmetric_padding_matches_torch(torch, assert_matches_torch, kernel_bias_fn):
    F = torch.nn.functional
    assert_matches_torch(
        kernel_bias_fn(mx.Conv(3, 4, (3, 3), padding=((1, 2), (0, 1)), use_bias=False)),
        lambda x, w: F.conv2d(F.pad(x, (0, 1, 1, 2)), w),  # F.pad: last axis first
        [torch.randn(2, 3, 5, 6), torch.randn(4, 3, 3, 3)],
        layouts=[_channels_last(2), _kernel_layout(2)],
        out_layout=_channels_last(2),
    )


def test_int_kernel_size_is_one_dimensional(numpy_init):
    init_fn, apply_fn = mx.transform(mx.Conv(3, 4, 5))
    variables = numpy_init(init_fn)
    assert variables["params"]["kernel"].shape == (5, 3, 4)
    y, _ = apply_fn(variables, None, jnp.ones((2, 10, 3)))
    assert y.shape == (2, 10, 4)


def test_kernel_shape_with_groups():
    init_fn, _ = mx.transform(mx.Conv(6, 9, (3, 2), groups=3, use_bias=False))
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    assert jax.tree.map(jnp.shape, shapes) == {"params": {"kernel": (3, 2, 2, 9)}}


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_any_number_of_batch_axes(numpy_init, batch):
    init_fn, apply_fn = mx.transform(mx.Conv(3, 4, (3, 3), strides=2))
    variables = numpy_init(init_fn)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((*batch, 6, 6, 3)), jnp.float32)
    y, _ = apply_fn(variables, None, x)
    flat, _ = apply_fn(variables, None, x.reshape(-1, 6, 6, 3))
    assert y.shape == (*batch, 3, 3, 4)
    # Other batch shapes, other convolution kernels: 27-term sums in their own orders.
    assert_close(y.reshape(flat.shape), flat, n=28)


def _primitives(fn, *args):
    return [(e.primitive.name, e.params.get("jaxpr")) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


@pytest.mark.parametrize("ndim", [1, 2])
def test_jaxpr_equals_hand_written(numpy_init, jitted_equations, ndim):
    spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[ndim]
    layer = mx.Conv(4, 8, (3,) * ndim, strides=2, dilation=1)
    init_fn, apply_fn = mx.transform(layer)
    params = numpy_init(init_fn)["params"]
    x = jnp.ones((2, *(8,) * ndim, 4))

    def hand_written(params, x):
        y = lax.conv_general_dilated(
            x, params["kernel"], (2,) * ndim, "SAME", dimension_numbers=spec
        )
        with jax.numpy_rank_promotion("allow"):
            return y + params["bias"]

    ours = jitted_equations(lambda p, x: apply_fn({"params": p}, None, x)[0], params, x)
    # Same primitives with the same parameters (layouts included: no transposes).
    assert ours == jitted_equations(hand_written, params, x)
    assert [name for name, _ in ours] == ["conv_general_dilated", "broadcast_in_dim", "add"]


def test_computation_and_param_dtype(numpy_init):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 3)), jnp.float32)
    init_fn, apply_fn = mx.transform(mx.Conv(3, 4, (3, 3), dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert variables["params"]["kernel"].dtype == jnp.float32
    y, _ = apply_fn(variables, None, x)
    assert y.dtype == jnp.bfloat16
    reference, _ = mx.transform(mx.Conv(3, 4, (3, 3)))[1](variables, None, x)
    np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=0.1, rtol=0.05)

    init_fn, apply_fn = mx.transform(mx.Conv(3, 4, (3, 3), param_dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    y, _ = apply_fn(variables, None, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16


def test_groups_must_divide_both_sizes():
    with pytest.raises(mx.errors.LayerConfigError) as info:
        mx.Conv(4, 6, (3, 3), groups=4)
    message = str(info.value)
    assert "groups=4" in message and "in_size=4" in message and "out_size=6" in message
    assert "groups=2 is the largest" in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=()), "at least one spatial axis"),
        (dict(kernel_size=(3, 0)), "positive int"),
        (dict(strides=(1, 2, 1)), "2 ints"),
        (dict(dilation=(1,)), "2 ints"),
        (dict(padding="FULL"), "`padding` must be"),
        (dict(padding=(1, 2, 3)), "`padding` must be"),
        (dict(padding=((1, 2), (0, -1))), "non-negative"),
        (dict(padding=((1, 2, 3), (0, 1))), "`padding` must be"),
        (dict(padding=1.5), "`padding` must be"),
        (dict(in_size=0), "positive int"),
    ],
)
def test_bad_config(kwargs, match):
    config = dict(in_size=3, out_size=4, kernel_size=(3, 3)) | kwargs
    with pytest.raises(mx.errors.LayerConfigError, match=match):
        mx.Conv(**config)


class _Net(mx.Module):
    def __init__(self):
        self.conv = mx.Conv(3, 4, (3, 3), padding="VALID")

    def __call__(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2, 8, 8, 5), ["in_size=3", "(2, 8, 8, 5)", "channels last"]),
        ((8, 3), ["2 spatial axes", "(8, 3)"]),
        ((2, 2, 8, 3), ["spatial axis 0", "size 2", "extent 3", 'padding="SAME"']),
    ],
)
def test_bad_input_shape(numpy_init, shape, expected):
    init_fn, apply_fn = mx.transform(_Net())
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones(shape))
    assert "Conv at 'conv'" in str(info.value)
    for text in expected:
        assert text in str(info.value)


def test_repr():
    assert mx.Conv(3, 4, (3, 3)).extra_repr() == "in_size=3, out_size=4, kernel_size=(3, 3)"
    layer = mx.Conv(4, 4, 3, strides=2, padding="VALID", groups=4, use_bias=False)
    assert layer.extra_repr() == (
        "in_size=4, out_size=4, kernel_size=(3,), strides=(2,), padding='VALID', groups=4, "
        "use_bias=False"
    )


# ConvTranspose: (in_size, out_size, kernel_size, input spatial shape, options by PyTorch's names;
# ours are the same, but `strides` for `stride`).
TRANSPOSE_CASES = {
    "1d-output_padding": (4, 6, 3, (5,), dict(stride=2, padding=1, output_padding=1)),
    "1d-dilation-large-padding": (
        3,
        2,
        2,
        (4,),
        dict(stride=3, padding=2, dilation=2, output_padding=2),
    ),
    "2d-mixed": (
        4,
        6,
        (3, 2),
        (4, 5),
        # axis 1: output_padding 1 is allowed by dilation 2 although the stride is 1.
        dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), output_padding=(1, 1)),
    ),
    "2d-groups": (4, 6, 3, (3, 4), dict(stride=2, padding=1, output_padding=1, groups=2)),
    "2d-depthwise": (4, 4, 2, (3, 3), dict(stride=2, groups=4)),
    "3d": (
        2,
        4,
        (2, 3, 2),
        (3, 4, 2),
        dict(stride=(2, 1, 2), padding=(0, 1, 1), output_padding=(1, 0, 0)),
    ),
}


def _transposed_kernel_layout(ndim):
    # PyTorch (in, out / groups, *kernel), split as (groups, in / groups, out / groups, *kernel),
    # -> (*kernel, in / groups, groups, out / groups), which reshapes to ours.
    return (*range(3, ndim + 3), 1, 0, 2)


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_transpose_matches_torch(torch, assert_matches_torch, kernel_bias_fn, case):
    in_size, out_size, kernel_size, spatial, options = TRANSPOSE_CASES[case]
    ndim = len(spatial)
    kernel = (kernel_size,) * ndim if isinstance(kernel_size, int) else kernel_size
    groups = options.get("groups", 1)
    split = (groups, in_size // groups, out_size // groups, *kernel)
    ours = {"strides" if k == "stride" else k: v for k, v in options.items()}
    layer_fn = kernel_bias_fn(ConvTranspose(in_size, out_size, kernel, **ours))
    conv_transpose = getattr(torch.nn.functional, f"conv_transpose{ndim}d")
    assert_matches_torch(
        lambda x, w, b: layer_fn(x, w.reshape(*kernel, in_size // groups, out_size), b),
        lambda x, w, b: conv_transpose(
            x, w.reshape(in_size, out_size // groups, *kernel), b, **options
        ),
        [torch.randn(2, in_size, *spatial), torch.randn(*split), torch.randn(out_size)],
        layouts=[_channels_last(ndim), _transposed_kernel_layout(ndim), None],
        out_layout=_channels_last(ndim),
    )


def test_transpose_module_matches_torch_module(torch):
    # The documented weight conversion, on a torch.nn.ConvTranspose2d without bias.
    theirs = torch.nn.ConvTranspose2d(4, 6, (3, 2), stride=2, groups=2, bias=False)
    w = theirs.weight.detach()
    kernel = w.reshape(2, 2, 3, 3, 2).permute(3, 4, 1, 0, 2).reshape(3, 2, 2, 6)
    _, apply_fn = mx.transform(ConvTranspose(4, 6, (3, 2), strides=2, groups=2, use_bias=False))
    x = torch.randn(2, 4, 5, 3)
    y, _ = apply_fn(
        {"params": {"kernel": jnp.asarray(kernel.numpy())}},
        None,
        jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
    )
    expected = theirs(x).detach().permute(0, 2, 3, 1).numpy()
    assert y.shape == expected.shape == (2, 11, 6, 6)
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def _lax_conv_transpose(x, kernel, bias, strides, padding, dilation):
    # jax.lax.conv_transpose(transpose_kernel=True) is the gradient of the Conv whose kernel is
    # ours with the two channel axes swapped.
    spatial = "DHW"[-(kernel.ndim - 2) :]
    y = lax.conv_transpose(
        x,
        jnp.swapaxes(kernel, -1, -2),
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        transpose_kernel=True,
    )
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


# (kernel_size, strides, dilation, input spatial shape): kernels longer and shorter than the
# stride, odd and even excess of the kernel's extent over the stride.
SAME_VALID_CASES = [
    ((3,), (2,), (1,), (5,)),
    ((4,), (2,), (1,), (5,)),
    ((5,), (3,), (1,), (4,)),
    ((2,), (3,), (1,), (4,)),
    ((1,), (2,), (1,), (3,)),
    ((3,), (1,), (2,), (6,)),
    ((3, 2), (2, 3), (1, 2), (4, 5)),
]


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel_size, strides, dilation, spatial", SAME_VALID_CASES)
def test_transpose_same_and_valid_match_lax_conv_transpose(
    numpy_init, kernel_size, strides, dilation, spatial, padding
):
    layer = ConvTranspose(3, 4, kernel_size, strides, padding, dilation)
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, *spatial, 3)), jnp.float32)
    y, _ = apply_fn(variables, None, x)
    params = variables["params"]
    expected = _lax_conv_transpose(x, params["kernel"], params["bias"], strides, padding, dilation)
    extents = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation, strict=True)]
    sizes = [n * s for n, s in zip(spatial, strides, strict=True)]
    if padding == "VALID":
        sizes = [n + max(e - s, 0) for n, e, s in zip(sizes, extents, strides, strict=True)]
    assert y.shape == expected.shape == (2, *sizes, 4)
    assert_close(y, expected, n=32)  # up to 3 x 3 taps of 3 channels, and the bias


def test_transpose_same_with_output_padding(numpy_init):
    layer = ConvTranspose(3, 4, 3, strides=2, padding="SAME", output_padding=1)
    init_fn, apply_fn = mx.transform(layer)
    y, _ = apply_fn(numpy_init(init_fn), None, jnp.ones((2, 5, 3)))
    assert y.shape == (2, 11, 4)


def test_transpose_pairs_crop_the_full_output(numpy_init):
    init_fn, apply_fn = mx.transform(ConvTranspose(3, 4, (3, 2), strides=2))
    variables = numpy_init(init_fn)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 5, 3)), jnp.float32)
    full, _ = apply_fn(variables, None, x)
    for padding, crop in [
        (((1, 2), (0, 1)), (slice(1, -2), slice(0, -1))),
        (1, (slice(1, -1), slice(1, -1))),
        ((2, 0), (slice(2, -2), slice(None))),
    ]:
        _, apply_cropped = mx.transform(ConvTranspose(3, 4, (3, 2), strides=2, padding=padding))
        y, _ = apply_cropped(variables, None, x)
        assert_close(y, full[:, crop[0], crop[1]], n=20)  # up to 3 x 2 taps of 3 channels


@pytest.mark.parametrize("padding", [1, ((1, 2),)])
def test_transpose_is_the_gradient_of_conv_with_the_same_padding(numpy_init, padding):
    # Conv(4 -> 3) on 8 positions; ConvTranspose(3 -> 4) with the same padding maps back.
    conv = mx.Conv(4, 3, 3, strides=2, padding=padding, use_bias=False)
    init_fn, apply_conv = mx.transform(conv)
    kernel = numpy_init(init_fn)["params"]["kernel"]
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 4)), jnp.float32)
    y, vjp = jax.vjp(lambda x: apply_conv({"params": {"kernel": kernel}}, None, x)[0], x)
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(y.shape), jnp.float32)
    (expected,) = vjp(cotangent)
    full = (y.shape[1] - 1) * 2 + 3
    low, high = (1, 1) if padding == 1 else padding[0]
    transpose = ConvTranspose(
        3, 4, 3, strides=2, padding=padding, output_padding=8 - (full - low - high), use_bias=False
    )
    _, apply_transpose = mx.transform(transpose)
    params = {"params": {"kernel": jnp.swapaxes(kernel, -1, -2)}}
    got, _ = apply_transpose(params, None, cotangent)
    assert_close(got, expected, n=16)  # 3 taps of 3 channels, summed in other orders


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_transpose_any_number_of_batch_axes(numpy_init, batch):
    init_fn, apply_fn = mx.transform(ConvTranspose(3, 4, (3, 3), strides=2, padding=1))
    variables = numpy_init(init_fn)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((*batch, 4, 4, 3)), jnp.float32)
    y, _ = apply_fn(variables, None, x)
    flat, _ = apply_fn(variables, None, x.reshape(-1, 4, 4, 3))
    assert y.shape == (*batch, 7, 7, 4)
    assert_close(y.reshape(flat.shape), flat, n=28)


def test_transpose_variables_and_program(numpy_init):
    layer = ConvTranspose(6, 9, (3, 2), groups=3)
    init_fn, apply_fn = mx.transform(layer)
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(init_fn, jax.random.key(0)))
    assert shapes == {"params": {"kernel": (3, 2, 2, 9), "bias": (9,)}}
    no_bias, _ = mx.transform(ConvTranspose(3, 4, 2, use_bias=False))
    assert jax.tree.map(jnp.shape, jax.eval_shape(no_bias, jax.random.key(0))) == {
        "params": {"kernel": (2, 3, 4)}
    }
    variables = numpy_init(init_fn)
    jaxpr = jax.make_jaxpr(lambda v, x: apply_fn(v, None, x)[0])(variables, jnp.ones((2, 4, 4, 6)))
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names == ["rev", "conv_general_dilated", "broadcast_in_dim", "add"]


def test_transpose_computation_dtype(numpy_init):
    init_fn, apply_fn = mx.transform(ConvTranspose(3, 4, (2, 2), strides=2, dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert variables["params"]["kernel"].dtype == jnp.float32
    y, _ = apply_fn(variables, None, jnp.ones((2, 3, 3, 3)))
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 6, 6, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_padding=2, strides=2), "axis 0 has output_padding 2, stride 2 and dilation 1"),
        (dict(output_padding=(0, 1)), "smaller than either the stride or the dilation"),
        (dict(padding="FULL"), '`padding` must be "SAME", "VALID"'),
        (dict(padding=(1, -1)), "non-negative sizes"),
        (dict(padding=(1, 1, 1)), "`padding` must be"),
        (dict(padding=((1, 2), (0, 1, 2))), "`padding` must be"),
        (dict(output_padding=1.0), "`output_padding` must be"),
        (dict(groups=2), "groups=2 must divide both in_size=3"),
        (dict(strides=(1, 2, 1)), "2 ints"),
        (dict(kernel_size=(3, 0)), "positive int"),
    ],
)
def test_transpose_bad_config(kwargs, match):
    config = dict(in_size=3, out_size=4, kernel_size=(3, 3)) | kwargs
    with pytest.raises(mx.errors.LayerConfigError, match=match):
        ConvTranspose(**config)


class _Up(mx.Module):
    def __init__(self):
        self.up = ConvTranspose(3, 4, (1, 1), padding=1)

    def __call__(self, x):
        return self.up(x)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2, 8, 8, 5), ["in_size=3", "(2, 8, 8, 5)", "channels last"]),
        ((8, 3), ["2 spatial axes", "(8, 3)"]),
        ((2, 2, 8, 3), ["spatial axis 0", "size 2", "output of size 0", "smaller padding"]),
    ],
)
def test_transpose_bad_input_shape(numpy_init, shape, expected):
    init_fn, apply_fn = mx.transform(_Up())
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones(shape))
    assert "ConvTranspose at 'up'" in str(info.value)
    for text in expected:
        assert text in str(info.value)


def test_transpose_repr():
    layer = ConvTranspose(3, 4, (3, 3))
    assert layer.extra_repr() == "in_size=3, out_size=4, kernel_size=(3, 3)"
    layer = ConvTranspose(4, 4, 3, strides=2, padding=1, output_padding=1, groups=4, use_bias=False)
    assert layer.extra_repr() == (
        "in_size=4, out_size=4, kernel_size=(3,), strides=(2,), padding=((1, 1),), "
        "output_padding=(1,), groups=4, use_bias=False"
    )
    assert "padding='SAME'" in ConvTranspose(3, 4, 3, padding="same").extra_repr()
