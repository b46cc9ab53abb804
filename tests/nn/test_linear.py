"""Dense, Einsum and Embed: PyTorch parity, batch axes, the jaxpr of a hand-written layer,
dtypes and errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.nn.linear import Einsum, Embed


@pytest.mark.parametrize(
    "batch, use_bias", [((), True), ((4,), True), ((2, 3), True), ((4,), False)]
)
def test_matches_torch_linear(torch, assert_matches_torch, kernel_bias_fn, batch, use_bias):
    linear = torch.nn.Linear(5, 3, bias=use_bias)
    x = torch.randn(*batch, 5)
    params = [linear.weight] + ([linear.bias] if use_bias else [])
    assert_matches_torch(
        kernel_bias_fn(mx.Dense(5, 3, use_bias=use_bias)),
        lambda x, *params: linear(x) if not params else torch.nn.functional.linear(x, *params),
        [x, *params],
        layouts=[None, (1, 0), None][: 1 + len(params)],
    )


def test_variables():
    params = mx.transform(mx.Dense(5, 3))[0](jax.random.key(0))["params"]
    assert params["kernel"].shape == (5, 3) and params["kernel"].dtype == jnp.float32
    assert float(jnp.abs(params["kernel"]).min()) > 0  # lecun_normal draws
    np.testing.assert_array_equal(params["bias"], np.zeros(3))
    no_bias, _ = mx.transform(mx.Dense(5, 3, use_bias=False))
    assert jax.tree.map(jnp.shape, jax.eval_shape(no_bias, jax.random.key(0))) == {
        "params": {"kernel": (5, 3)}
    }


def test_custom_initializers():
    ones, half = mx.initializers.ones, mx.initializers.constant(0.5)
    layer = mx.Dense(5, 3, kernel_init=ones, bias_init=half)
    params = mx.transform(layer)[0](jax.random.key(0))["params"]
    np.testing.assert_array_equal(params["kernel"], np.ones((5, 3)))
    np.testing.assert_array_equal(params["bias"], np.full(3, 0.5))


@pytest.mark.parametrize("batch", [(), (8,), (2, 8)])
def test_jaxpr_equals_hand_written(numpy_init, jitted_equations, batch):
    init_fn, apply_fn = mx.transform(mx.Dense(16, 4))
    params = numpy_init(init_fn)["params"]
    x = jnp.ones((*batch, 16))

    def hand_written(params, x):
        with jax.numpy_rank_promotion("allow"):
            return x @ params["kernel"] + params["bias"]

    ours = jitted_equations(lambda p, x: apply_fn({"params": p}, None, x)[0], params, x)
    assert ours == jitted_equations(hand_written, params, x)
    # dot_general (+ broadcast_in_dim with batch axes) + add: no convert_element_type, no reshape.
    assert len(ours) == (3 if batch else 2)


def test_computation_dtype(numpy_init):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
    layer = mx.Dense(8, 3, dtype=jnp.bfloat16)
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    assert variables["params"]["kernel"].dtype == jnp.float32  # storage stays float32
    y, _ = apply_fn(variables, None, x)
    assert y.dtype == jnp.bfloat16
    reference, _ = mx.transform(mx.Dense(8, 3))[1](variables, None, x)
    np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=5e-2, rtol=5e-2)
    grads = jax.jit(jax.grad(lambda v: apply_fn(v, None, x)[0].astype(jnp.float32).sum()))(
        variables
    )
    assert grads["params"]["kernel"].dtype == jnp.float32


def test_param_dtype(numpy_init):
    init_fn, apply_fn = mx.transform(mx.Dense(8, 3, param_dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    x16 = jnp.ones((2, 8), jnp.bfloat16)
    y, _ = apply_fn(variables, None, x16)
    assert y.dtype == jnp.bfloat16
    # dtype=None and agreeing dtypes: no cast at all.
    jaxpr = jax.make_jaxpr(lambda v, x: apply_fn(v, None, x)[0])(variables, x16)
    assert "convert_element_type" not in [e.primitive.name for e in jaxpr.jaxpr.eqns]
    # dtype=None with a float32 input: promoted to float32, as JAX would (also under strict).
    y32, _ = apply_fn(variables, None, jnp.ones((2, 8)))
    assert y32.dtype == jnp.float32


def test_integer_input_promotes_to_parameter_dtype(numpy_init):
    init_fn, apply_fn = mx.transform(mx.Dense(3, 2))
    y, _ = apply_fn(numpy_init(init_fn), None, jnp.arange(6, dtype=jnp.int32).reshape(2, 3))
    assert y.dtype == jnp.float32


class _Net(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(5, 3)

    def __call__(self, x, **kwargs):
        return self.fc(x, **kwargs)


@pytest.mark.parametrize("shape", [(2, 4), ()])
def test_wrong_input_size(numpy_init, shape):
    init_fn, apply_fn = mx.transform(_Net())
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones(shape))
    message = str(info.value)
    assert "Dense at 'fc'" in message
    assert "in_size=5" in message and str(shape) in message
    assert "in_size equal to the input's last axis" in message


@pytest.mark.parametrize("use_bias", [True, False])
def test_heads_split_the_output(numpy_init, use_bias):
    init_fn, apply_fn = mx.transform(mx.Dense(8, 12, use_bias=use_bias, dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 8)), jnp.float32)

    @jax.jit
    def outputs(variables, x):
        plain = apply_fn(variables, None, x)[0]
        return (
            plain,
            apply_fn(variables, None, x, heads=3)[0],
            apply_fn(variables, None, x[0, 0], heads=12)[0],
        )

    plain, split, one = outputs(variables, x)
    assert split.shape == (2, 5, 3, 4) and split.dtype == jnp.bfloat16
    assert_close(split, plain.reshape(2, 5, 3, 4), n=8)
    assert_close(one, plain[0, 0].reshape(12, 1), n=8)


@pytest.mark.parametrize("heads", [5, 0, -3, 2.0, True, "3"])
def test_heads_must_divide_out_size(numpy_init, heads):
    init_fn, apply_fn = mx.transform(_Net())
    with pytest.raises(mx.errors.LayerConfigError, match=r"Dense at 'fc'.*dividing out_size=3"):
        apply_fn(numpy_init(init_fn), None, jnp.ones((2, 5)), heads=heads)


@pytest.mark.parametrize("sizes", [(0, 3), (3, -1), (2.5, 3), (True, 3), ("4", 3)])
def test_bad_sizes(sizes):
    with pytest.raises(mx.errors.LayerConfigError, match="positive int"):
        mx.Dense(*sizes)


def test_repr():
    assert mx.Dense(3, 4).extra_repr() == "in_size=3, out_size=4, use_bias=True"
    assert "in_size=3, out_size=4" in repr(mx.Dense(3, 4))


# Einsum: (spec, kernel shape, bias shape, input shape)
EINSUM_CASES = {
    "heads-in": ("btd,dhk->bthk", (6, 2, 3), (2, 3), (2, 4, 6)),
    "heads-out": ("bthk,hkd->btd", (2, 3, 5), (5,), (2, 4, 2, 3)),
    "per-head": ("bhd,hdk->bhk", (3, 4, 2), None, (2, 3, 4)),
    "ellipsis": ("...td,dk->...tk", (4, 3), (1, 3), (2, 5, 4)),
    "kernel-only-sum": ("bd,dek->bk", (4, 2, 3), (3,), (5, 4)),
}


@pytest.mark.parametrize("case", EINSUM_CASES)
def test_einsum_matches_torch(torch, assert_matches_torch, kernel_bias_fn, case):
    spec, shape, bias_shape, x_shape = EINSUM_CASES[case]
    params = [torch.randn(*shape)] + ([] if bias_shape is None else [torch.randn(*bias_shape)])
    assert_matches_torch(
        kernel_bias_fn(Einsum(spec, shape, bias_shape=bias_shape)),
        lambda x, w, *b: torch.einsum(spec, x, w) + (b[0] if b else 0),
        [torch.randn(*x_shape), *params],
        layouts=[None] * (1 + len(params)),
    )


def test_einsum_equals_hand_written(numpy_init, jitted_equations):
    init_fn, apply_fn = mx.transform(Einsum("b t d, d h k -> b t h k", (6, 2, 3), (2, 3)))
    params = numpy_init(init_fn)["params"]
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 6)), jnp.float32)

    def hand_written(params, x):
        with jax.numpy_rank_promotion("allow"):
            return jnp.einsum("btd,dhk->bthk", x, params["kernel"]) + params["bias"]

    ours = lambda p, x: apply_fn({"params": p}, None, x)[0]  # noqa: E731
    assert_close(ours(params, x), hand_written(params, x), n=7)  # a 6-term dot and the bias
    assert jitted_equations(ours, params, x) == jitted_equations(hand_written, params, x)


@pytest.mark.parametrize(
    "spec, shape, fan_in",
    [
        ("btd,dhk->bthk", (256, 4, 8), 256),  # d contracted; h, k are outputs
        ("bthk,hkd->btd", (4, 64, 32), 256),  # h, k contracted
        ("bhd,hdk->bhk", (4, 256, 8), 256),  # h is a batch axis of the kernel
        ("bd,dek->bk", (64, 4, 32), 256),  # e, summed over the kernel alone, counts too
    ],
)
def test_einsum_default_init_reads_fans_from_spec(spec, shape, fan_in):
    kernel = mx.transform(Einsum(spec, shape))[0](jax.random.key(0))["params"]["kernel"]
    assert abs(float(kernel.std()) * fan_in**0.5 - 1) < 0.05


def test_einsum_variables_and_dtypes(numpy_init):
    layer = Einsum("...d,dk->...k", (4, 3), bias_shape=(3,), dtype=jnp.bfloat16)
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == {
        "params": {"kernel": ((4, 3), jnp.float32), "bias": ((3,), jnp.float32)}
    }
    y, _ = apply_fn(variables, None, jnp.ones((4,)))  # "..." may stand for no axis
    assert y.shape == (3,) and y.dtype == jnp.bfloat16
    ones = mx.initializers.ones
    no_bias = mx.transform(Einsum("bd,dk->bk", (4, 3), kernel_init=ones))[0]
    assert jax.tree.map(jnp.shape, jax.eval_shape(no_bias, jax.random.key(0))) == {
        "params": {"kernel": (4, 3)}
    }
    assert Einsum("bd,dk->bk", (4, 3)).extra_repr() == (
        "spec='bd,dk->bk', shape=(4, 3), bias_shape=None"
    )


@pytest.mark.parametrize(
    "spec, shape, bias_shape, match",
    [
        ("btd,dk", (4, 3), None, "is not of the form 'input,kernel->output'"),
        ("bd,dk,kl->bl", (4, 3), None, "is not of the form"),
        ("bd->bd", (4, 3), None, "is not of the form"),
        (42, (4, 3), None, "is not of the form"),
        ("b1,1k->bk", (4, 3), None, "has subscripts 'b1'"),
        ("...d,...dk->...k", (4, 3), None, "gives the kernel '...'"),
        ("...d,dk->k", (4, 3), None, "has '...' on one side only"),
        ("bd,dk->bk", (4, 3, 2), None, "names the kernel's axes 'dk', but shape=(4, 3, 2)"),
        ("bd,dd->bd", (4, 4), None, "one distinct letter per size"),
        ("bd,dk->bz", (4, 3), None, "has output 'bz'"),
        ("bd,dk->bkk", (4, 3), None, "Name each output axis once"),
        ("bd,dk->bk", (4, 0), None, "`shape` must be a sequence of positive ints"),
        ("bd,dk->bk", 4, None, "`shape` must be a sequence"),
        (
            "bd,dk->bk",
            (4, 3),
            (2, 3, 1),
            "has 3 axes, but spec 'bd,dk->bk' names only 2 output axes",
        ),
        ("...d,dk->...k", (4, 3), (2, 3), "names only 1 output axis after any '...' ('k')"),
        ("bd,dk->bk", (4, 3), (2,), "gives output axis 'k' size 2, but the kernel"),
        ("bd,dk->bk", (4, 3), (0,), "`bias_shape` must be a sequence of positive ints"),
    ],
)
def test_einsum_bad_config(spec, shape, bias_shape, match):
    with pytest.raises(mx.errors.LayerConfigError, match=re.escape(match)):
        Einsum(spec, shape, bias_shape=bias_shape)


class _Projection(mx.Module):
    def __init__(self, spec="btd,dk->btk", bias_shape=None):
        self.proj = Einsum(spec, (4, 3), bias_shape=bias_shape)

    def __call__(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    "spec, bias_shape, x_shape, expected",
    [
        ("btd,dk->btk", None, (2, 4), ["names the input's axes 'btd'", "needs 3 axes", "(2, 4)"]),
        ("...d,dk->...k", None, (), ["needs at least 1 axes", "shape ()"]),
        ("btd,dk->btk", None, (2, 5, 6), ["axis 'd'", "size 4 in the kernel of shape (4, 3)"]),
        ("bdd,dk->bk", None, (2, 4, 5), ["axis 'd'", "size 4 in the kernel", "size 5"]),
        ("btd,dk->btk", (5, 3), (2, 6, 4), ["bias of shape (5, 3)", "axis 't' size 5"]),
    ],
)
def test_einsum_bad_input(numpy_init, spec, bias_shape, x_shape, expected):
    init_fn, apply_fn = mx.transform(_Projection(spec, bias_shape))
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones(x_shape))
    assert "Einsum at 'proj'" in str(info.value)
    for text in expected:
        assert text in str(info.value)


def test_einsum_bias_along_an_input_axis(numpy_init):
    init_fn, apply_fn = mx.transform(Einsum("btd,dk->btk", (4, 3), bias_shape=(5, 1)))
    variables = numpy_init(init_fn)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 4)), jnp.float32)
    y, _ = apply_fn(variables, None, x)
    params = variables["params"]
    expected = np.einsum("btd,dk->btk", x, params["kernel"]) + np.asarray(params["bias"])
    assert_close(y, expected, n=5)  # NumPy's 4-term sums against XLA's, and the bias


def test_embed_matches_torch(torch, assert_matches_torch):
    ids = np.array([[1, 4, 4], [0, 9, 1]])
    _, apply_fn = mx.transform(Embed(10, 5))
    assert_matches_torch(
        lambda table: apply_fn({"params": {"embedding": table}}, None, ids)[0],
        lambda table: torch.nn.functional.embedding(torch.from_numpy(ids), table),
        [torch.nn.Embedding(10, 5).weight],  # repeated ids: their gradients add up
        layouts=[None],
    )


def test_embed_attend_matches_torch(torch, assert_matches_torch):
    _, apply_fn = mx.transform(Embed(10, 5), method="attend")
    assert_matches_torch(
        lambda x, table: apply_fn({"params": {"embedding": table}}, None, x)[0],
        torch.nn.functional.linear,
        [torch.randn(2, 3, 5), torch.randn(10, 5)],
        layouts=[None, None],
    )


def test_embed_variables_and_shapes():
    init_fn, apply_fn = mx.transform(Embed(512, 16))
    variables = init_fn(jax.random.key(0))
    table = variables["params"]["embedding"]
    assert table.shape == (512, 16) and table.dtype == jnp.float32
    assert abs(float(table.std()) - 1) < 0.05 and abs(float(table.mean())) < 0.05  # N(0, 1)
    for ids in (3, [3, 7], np.ones((2, 3), np.int64)):
        y, _ = apply_fn(variables, None, ids)
        assert y.shape == (*np.shape(ids), 16)
        np.testing.assert_array_equal(y, table[np.asarray(ids)])
    assert Embed(10, 4).extra_repr() == "num_embeddings=10, features=4"


def test_embed_ids_out_of_range(numpy_init):
    init_fn, apply_fn = mx.transform(Embed(4, 3))
    variables = numpy_init(init_fn)
    table = np.asarray(variables["params"]["embedding"])
    ids = jnp.array([0, -1, -4, 4, -5, 100])
    y, _ = apply_fn(variables, None, ids)
    np.testing.assert_array_equal(y[:3], table[[0, 3, 0]])  # negative ids count from the end
    assert np.isnan(np.asarray(y[3:])).all()  # the others give NaN rows

    def total(v):
        return jnp.nansum(apply_fn(v, None, ids)[0])

    grad = jax.grad(total)(variables)["params"]["embedding"]
    np.testing.assert_array_equal(grad, np.array([[2.0] * 3, [0] * 3, [0] * 3, [1] * 3]))


def test_embed_dtypes(numpy_init):
    init_fn, apply_fn = mx.transform(Embed(6, 4, dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert variables["params"]["embedding"].dtype == jnp.float32
    assert apply_fn(variables, None, jnp.array([1, 2]))[0].dtype == jnp.bfloat16
    init_fn, apply_fn = mx.transform(Embed(6, 4, param_dtype=jnp.bfloat16))
    variables = numpy_init(init_fn)
    assert apply_fn(variables, None, jnp.array([1, 2]))[0].dtype == jnp.bfloat16
    _, attend = mx.transform(Embed(6, 4, param_dtype=jnp.bfloat16), method="attend")
    assert attend(variables, None, jnp.ones((2, 4)))[0].dtype == jnp.float32  # promoted


class _TiedLanguageModel(mx.Module):
    def __init__(self):
        self.embed = Embed(10, 4)
        self.hidden = mx.Dense(4, 4)

    def __call__(self, ids):
        return self.embed.attend(mx.tanh(self.hidden(self.embed(ids))))


def test_embed_tied_output_projection(numpy_init):
    init_fn, apply_fn = mx.transform(_TiedLanguageModel())
    variables = numpy_init(init_fn)
    assert set(variables["params"]["embed"]) == {"embedding"}  # one table, used twice
    ids = jnp.array([[1, 2, 3]])
    logits, _ = apply_fn(variables, None, ids)
    params = variables["params"]
    table, dense = params["embed"]["embedding"], params["hidden"]
    with jax.numpy_rank_promotion("allow"):
        hidden = jnp.tanh(table[ids] @ dense["kernel"] + dense["bias"])
    assert logits.shape == (1, 3, 10)
    assert_close(logits, hidden @ table.T, n=16)  # jitted or not, tanh and two short dots


@pytest.mark.parametrize(
    "ids", [jnp.array([0.0, 1.0]), np.array([True, False]), [0.5]], ids=["float", "bool", "list"]
)
def test_embed_non_integer_ids(numpy_init, ids):
    init_fn, apply_fn = mx.transform(_TiedLanguageModel())
    with pytest.raises(mx.errors.InputDtypeError) as info:
        apply_fn(numpy_init(init_fn), None, ids)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert "Embed at 'embed'" in message and "expected integer ids" in message
    assert "ids.astype(jnp.int32)" in message


@pytest.mark.parametrize("shape", [(2, 3), ()])
def test_embed_attend_wrong_size(numpy_init, shape):
    init_fn, apply_fn = mx.transform(Embed(10, 4), method="attend")
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones(shape))
    assert "features=4" in str(info.value) and str(shape) in str(info.value)


@pytest.mark.parametrize("sizes", [(0, 3), (3, -1), (2.5, 3), (True, 3)])
def test_embed_bad_sizes(sizes):
    with pytest.raises(mx.errors.LayerConfigError, match="positive int"):
        Embed(*sizes)
