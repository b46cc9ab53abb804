"""mx.lora, mx.LoRA and mx.merge_lora (metoryx/lora.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import metoryx as mx
from metoryx import errors
from tests._finetune import accuracy as accuracy_of
from tests._finetune import digits_example, fit
from tests._tolerance import assert_close

LORA = mx.filters.tag("lora")


def _conv(x, kernel, layer, groups=None):
    """A channels-last convolution with ``layer``'s window settings, written out with lax."""
    ndim = len(layer.kernel_size)
    dims = lax.conv_dimension_numbers(
        x.shape,
        kernel.shape,
        ("N" + "HWD"[:ndim] + "C", "HWD"[:ndim] + "IO", "N" + "HWD"[:ndim] + "C"),
    )
    return lax.conv_general_dilated(
        x,
        kernel,
        layer.strides,
        layer.padding,
        rhs_dilation=layer.dilation,
        dimension_numbers=dims,
        feature_group_count=layer.groups if groups is None else groups,
    )


def _grouped_delta(a, b, groups):
    """``A B`` of a grouped convolution by loops: output channel ``o`` of group ``g`` reads
    ``A``'s channels ``g * rank ...``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rank, out = b.shape
    delta = np.zeros((*a.shape[:-1], out))
    for o in range(out):
        g = o // (out // groups)
        delta[..., o] = a[..., g * rank : (g + 1) * rank] @ b[:, o]
    return delta


# One row per adapted layer: the layer, an input, and the update B(A(x)) written by hand.
CASES = {
    "dense": (
        lambda: mx.Dense(6, 5),
        lambda: jax.random.normal(jax.random.key(1), (3, 6)),
        lambda layer, x, a, b: x @ a @ b,
    ),
    "conv1d": (
        lambda: mx.Conv(3, 4, kernel_size=3, strides=2, padding="VALID"),
        lambda: jax.random.normal(jax.random.key(1), (2, 9, 3)),
        lambda layer, x, a, b: _conv(x, a, layer) @ b,
    ),
    "conv2d": (
        lambda: mx.Conv(3, 4, kernel_size=(3, 2), padding=1, dilation=(1, 2)),
        lambda: jax.random.normal(jax.random.key(1), (2, 5, 6, 3)),
        lambda layer, x, a, b: _conv(x, a, layer) @ b,
    ),
    "conv2d groups": (
        lambda: mx.Conv(4, 6, kernel_size=(2, 2), groups=2),
        lambda: jax.random.normal(jax.random.key(1), (2, 4, 4, 4)),
        lambda layer, x, a, b: _conv(x, jnp.asarray(_grouped_delta(a, b, 2), x.dtype), layer),
    ),
    "einsum": (
        lambda: mx.Einsum("btd,dhk->bthk", (6, 2, 3), bias_shape=(2, 3)),
        lambda: jax.random.normal(jax.random.key(1), (2, 4, 6)),
        lambda layer, x, a, b: jnp.einsum("btd,dr,rhk->bthk", x, a, b),
    ),
    "einsum per head": (
        lambda: mx.Einsum("...hd,hdk->...hk", (2, 5, 3)),
        lambda: jax.random.normal(jax.random.key(1), (4, 2, 5)),
        lambda layer, x, a, b: jnp.einsum("...hd,hdr,rhk->...hk", x, a, b),
    ),
    "embed": (
        lambda: mx.Embed(7, 5),
        lambda: jnp.array([[0, 3, 6], [2, 2, 5]]),
        lambda layer, ids, a, b: a[ids] @ b,
    ),
}


def _base_params(params):
    return {k: v for k, v in params.items() if not k.startswith("lora_")}


def _random_adapters(variables, key):
    """The variables with A and B drawn at random: an update that is not zero."""
    params = dict(variables["params"])
    for i, name in enumerate(("lora_a", "lora_b")):
        shape = params[name].shape
        params[name] = jax.random.normal(jax.random.fold_in(key, i), shape) / math.sqrt(shape[0])
    return {**variables, "params": params}


@pytest.mark.parametrize("case", CASES)
def test_a_lora_layer_starts_exactly_as_its_base_and_adds_the_scaled_update(case):
    make, make_x, update = CASES[case]
    base, x = make(), make_x()
    adapted = mx.lora(base, rank=2, alpha=3.0)
    assert isinstance(adapted, mx.LoRA) and adapted.base is not base  # a copy
    variables = mx.init(adapted)(jax.random.key(0))
    base_variables = {"params": _base_params(variables["params"])}
    expected, _ = mx.apply(base)(base_variables, None, x)
    y, _ = mx.apply(adapted)(variables, None, x)
    np.testing.assert_array_equal(y, expected)  # an added exact zero changes nothing

    variables = _random_adapters(variables, jax.random.key(2))
    params = variables["params"]
    y, _ = mx.apply(adapted)(variables, None, x)
    desired = expected + 1.5 * update(adapted.base, x, params["lora_a"], params["lora_b"])
    assert_close(y, desired, n=64, scale=np.abs(desired).max() + 1)


@pytest.mark.parametrize("case", CASES)
def test_merging_folds_the_update_into_weights_the_original_class_loads(case):
    make, make_x, _ = CASES[case]
    base, x = make(), make_x()
    adapted = mx.lora(base, rank=2)
    variables = _random_adapters(mx.init(adapted)(jax.random.key(0)), jax.random.key(2))
    plain, plain_variables = mx.merge_lora(adapted, variables)
    assert type(plain) is type(base) and not isinstance(plain, mx.LoRA)
    original = mx.init(make())(jax.random.key(0))
    assert jax.tree.structure(plain_variables) == jax.tree.structure(original)
    assert jax.tree.map(jnp.shape, plain_variables) == jax.tree.map(jnp.shape, original)
    y, _ = mx.apply(adapted)(variables, None, x)
    y_original, _ = mx.apply(make())(plain_variables, None, x)  # a fresh instance of the class
    assert_close(y_original, y, n=64, scale=np.abs(y).max() + 1)
    assert sorted(variables["params"]) == sorted([*plain_variables["params"], "lora_a", "lora_b"])


@pytest.mark.parametrize("case", CASES)
def test_base_weights_keep_their_paths_and_adapters_are_tagged(case):
    make = CASES[case][0]

    class Net(mx.Module):
        def __init__(self):
            self.body = [make()]

    pretrained = mx.init(Net())(jax.random.key(5))
    adapted = mx.lora(Net(), rank=1)
    info = mx.variable_info(adapted)
    variables = mx.init(adapted)(jax.random.key(0))
    adapters, rest = mx.partition(variables, LORA, info)
    assert jax.tree.structure(rest) == jax.tree.structure(pretrained)  # a checkpoint fits
    assert sorted(adapters["params"]["body"]["0"]) == ["lora_a", "lora_b"]
    assert info["params"]["body"]["0"]["lora_b"].tags == ("lora",)
    assert all(i.tags == () for i in jax.tree.leaves(mx.filter(info, ~LORA, info)))
    # The pretrained arrays load into the adapted model by path.
    loaded = mx.assign_variables(adapted, mx.combine(pretrained, adapters))
    assert loaded.body[0].base.__dict__[CASES_WEIGHT[case]].has_value


CASES_WEIGHT = {case: "embedding" if case == "embed" else "kernel" for case in CASES}


def test_embed_attend_uses_the_adapted_table_as_merging_does():
    adapted = mx.lora(mx.Embed(7, 5), rank=2)
    variables = _random_adapters(mx.init(adapted)(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(3), (3, 5))
    logits, _ = mx.apply(adapted, method="attend")(variables, None, x)
    plain, plain_variables = mx.merge_lora(adapted, variables)
    expected, _ = mx.apply(plain, method="attend")(plain_variables, None, x)
    assert_close(logits, expected, n=16, scale=np.abs(expected).max() + 1)
    with pytest.raises(errors.ModuleAttributeError, match="attend is the tied output"):
        mx.apply(mx.lora(mx.Dense(5, 7), rank=2), method="attend")(
            mx.init(mx.lora(mx.Dense(5, 7), rank=2))(jax.random.key(0)), None, x
        )


def test_the_base_configuration_reads_through_the_wrapper():
    adapted = mx.lora(mx.Dense(6, 5), rank=2)
    assert (adapted.in_size, adapted.out_size, adapted.rank, adapted.scale) == (6, 5, 2, 1.0)
    assert "LoRA(" in repr(adapted) and "rank=2, alpha=2" in repr(adapted)


@pytest.mark.parametrize("dtype, param_dtype", [(None, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_adapters_are_stored_in_param_dtype_and_computed_in_dtype(dtype, param_dtype):
    base = mx.Dense(4, 3, dtype=dtype, param_dtype=param_dtype)
    adapted = mx.lora(base, rank=2)
    variables = mx.init(adapted)(jax.random.key(0))
    assert variables["params"]["lora_a"].dtype == param_dtype
    x = jnp.ones((2, 4), jnp.bfloat16)
    y, _ = mx.apply(adapted)(variables, None, x)
    base_y, _ = mx.apply(base)({"params": _base_params(variables["params"])}, None, x)
    assert y.dtype == base_y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, base_y)


# --- inside mx.Repeat ------------------------------------------------------------------------


class Block(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(4, 4)
        self.norm = mx.LayerNorm(4)

    def __call__(self, x):
        return x + self.norm(mx.relu(self.fc(x)))


class Deep(mx.Module):
    def __init__(self):
        self.blocks = mx.Repeat(Block, 3)
        self.head = mx.Dense(4, 2)

    def __call__(self, x):
        return self.head(self.blocks(x))


def test_layers_inside_repeat_get_stacked_adapters_that_train_and_merge():
    x = jax.random.normal(jax.random.key(1), (5, 4))
    model = Deep()
    pretrained = mx.init(model)(jax.random.key(0))
    adapted = mx.lora(model, rank=2, target=lambda path, m: path[0] == "blocks")
    info = mx.variable_info(adapted)
    assert info["params"]["blocks"]["fc"]["lora_a"].shape == (3, 4, 2)
    assert info["params"]["blocks"]["fc"]["lora_b"].stacked == (3,)
    assert "lora_a" not in info["params"]["head"]

    adapters, _ = mx.partition(mx.init(adapted)(jax.random.key(7)), LORA, info)
    variables = mx.combine(pretrained, adapters)
    apply_fn = mx.apply(adapted)
    y, _ = apply_fn(variables, None, x)
    np.testing.assert_array_equal(y, mx.apply(model)(pretrained, None, x)[0])

    def loss(trainable):
        return jnp.sum(apply_fn(mx.combine(trainable, pretrained), None, x)[0] ** 2)

    grads = jax.grad(loss)(adapters)
    # B starts at zero, so only B has a gradient at the first step, one per copy.
    b_grad = grads["params"]["blocks"]["fc"]["lora_b"]
    assert all(float(jnp.abs(b_grad[i]).max()) > 0 for i in range(3))
    stepped = jax.tree.map(lambda v, g: v - 0.1 * g, adapters, grads)
    trained = mx.combine(pretrained, stepped)
    assert float(loss(stepped)) < float(loss(adapters))

    plain, plain_variables = mx.merge_lora(adapted, trained)
    assert isinstance(plain.blocks.module.fc, mx.Dense)
    y_plain, _ = mx.apply(Deep())(plain_variables, None, x)
    assert_close(y_plain, apply_fn(trained, None, x)[0], n=64, scale=4.0)


def test_tied_layers_get_one_adapter_and_stay_tied():
    class Tied(mx.Module):
        def __init__(self):
            shared = mx.Dense(3, 3)
            self.first, self.second = shared, shared

        def __call__(self, x):
            return self.second(self.first(x))

    adapted = mx.lora(Tied(), rank=1)
    assert adapted.first is adapted.second and isinstance(adapted.first, mx.LoRA)
    assert list(mx.init(adapted)(jax.random.key(0))["params"]) == ["first"]


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_drops_the_adapter_input_only_while_the_layer_trains():
    x = jax.random.normal(jax.random.key(1), (4, 6))
    adapted = mx.lora(mx.Dense(6, 5), rank=2, dropout=0.5)
    variables = _random_adapters(mx.init(adapted)(jax.random.key(0)), jax.random.key(2))
    without, _ = mx.apply(mx.lora(mx.Dense(6, 5), rank=2))(variables, None, x)

    adapted.training = False
    y, _ = mx.apply(adapted)(variables, None, x)
    np.testing.assert_array_equal(y, without)

    mx.set_training(adapted, True)
    apply_fn = mx.apply(adapted)
    y1, _ = apply_fn(variables, jax.random.key(3), x)
    y2, _ = apply_fn(variables, jax.random.key(3), x)
    np.testing.assert_array_equal(y1, y2)  # the keys decide the mask
    assert not np.allclose(y1, without)
    # With B at zero the dropped adapter adds nothing: the base part is never dropped.
    zero_b = {"params": {**variables["params"], "lora_b": jnp.zeros((2, 5))}}
    base_y, _ = mx.apply(mx.Dense(6, 5))({"params": _base_params(variables["params"])}, None, x)
    np.testing.assert_array_equal(apply_fn(zero_b, jax.random.key(3), x)[0], base_y)

    with pytest.raises(errors.MissingRngError):
        apply_fn(variables, None, x)


def test_dropout_without_a_training_switch_or_flag_says_how_to_set_it():
    adapted = mx.lora(mx.Dense(6, 5), rank=2, dropout=0.1)
    variables = mx.init(adapted)(jax.random.key(0))
    with pytest.raises(errors.LayerConfigError, match=r"layer.training = True"):
        mx.apply(adapted)(variables, None, jnp.ones((1, 6)))
    # A call may pass the flag itself.
    y, _ = mx.apply(adapted)(variables, None, jnp.ones((1, 6)), is_training=False)
    assert y.shape == (1, 5)


# --- errors ----------------------------------------------------------------------------------


class Net(mx.Module):
    def __init__(self):
        self.encoder = mx.MLP(4, [8], 8)
        self.norm = mx.LayerNorm(8)
        self.head = mx.Dense(8, 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mx.lora(Net(), 2, target="haed"), errors.NoMatchError, r"closest.*head"),
        (lambda: mx.lora(Net(), 2, target="norm"), errors.NoMatchError, r"LayerNorm at 'norm'"),
        (lambda: mx.lora(Net(), 2, target="encoder"), errors.NoMatchError, r"'encoder/\*\*'"),
        (lambda: mx.lora(Net(), 2, target=lambda p, m: False), errors.NoMatchError, "predicate"),
        (lambda: mx.lora(mx.LayerNorm(3), 1), errors.NoMatchError, "none of the layers"),
        (lambda: mx.lora(Net(), 2, target=mx.LayerNorm), errors.LayerConfigError, "LayerNorm"),
        (
            lambda: mx.lora(Net(), 2, target=(mx.Dense, mx.ConvTranspose)),
            errors.LayerConfigError,
            "ConvTranspose",
        ),
        (lambda: mx.lora(Net(), 2, target=3), errors.LayerConfigError, "`target` must be"),
        (lambda: mx.lora(Net(), 2, target="a//b"), errors.LayerConfigError, "not a path glob"),
        (
            lambda: mx.lora(Net(), 2, target=lambda p, m: "yes"),
            errors.LayerConfigError,
            "True or False",
        ),
        (lambda: mx.lora(Net(), 0), errors.LayerConfigError, "rank"),
        (lambda: mx.lora(Net(), 2.0), errors.LayerConfigError, "rank"),
        (lambda: mx.lora(Net(), 3), errors.LayerConfigError, r"'head' allows .* = 2"),
        (lambda: mx.lora(mx.Conv(2, 8, 1), 3), errors.LayerConfigError, r"min\(1 \* 2 // 1"),
        (lambda: mx.lora(mx.Embed(3, 8), 4), errors.LayerConfigError, "num_embeddings"),
        (
            lambda: mx.lora(mx.Einsum("bd,dhk->bhk", (2, 3, 4)), 3),
            errors.LayerConfigError,
            "contracted",
        ),
        (lambda: mx.lora(Net(), 2, alpha=0), errors.LayerConfigError, "alpha"),
        (lambda: mx.lora(Net(), 2, alpha=float("nan")), errors.LayerConfigError, "alpha"),
        (lambda: mx.lora(Net(), 2, dropout=1.0), errors.LayerConfigError, "dropout"),
        (lambda: mx.lora(Net(), 2, dropout=-0.1), errors.LayerConfigError, "dropout"),
        (
            lambda: mx.lora(mx.lora(Net(), 2, target="head"), 2, target="head"),
            errors.LayerConfigError,
            "already have LoRA",
        ),
        (lambda: mx.LoRA(mx.LayerNorm(3), 1), errors.LayerConfigError, "`base` must be"),
        (lambda: mx.LoRA(mx.Dense(2, 3), 3), errors.LayerConfigError, r"min\(in_size, out_size\)"),
        (lambda: mx.merge_lora(Net(), {}), errors.LayerConfigError, "no LoRA layer"),
        (
            lambda: mx.merge_lora(mx.lora(mx.Dense(2, 3), 1), []),
            errors.VariablesStructureError,
            "nested dict",
        ),
    ],
)
def test_bad_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_merge_names_missing_and_misshapen_variables():
    adapted = mx.lora(mx.Dense(2, 3), rank=1)
    variables = mx.init(adapted)(jax.random.key(0))
    params = variables["params"]
    with pytest.raises(errors.VariablesStructureError, match="Missing.*lora_b"):
        mx.merge_lora(adapted, {"params": _base_params(params) | {"lora_a": params["lora_a"]}})
    with pytest.raises(errors.VariableShapeError, match=r"params/lora_a: expected \(2, 1\)"):
        mx.merge_lora(adapted, {"params": {**params, "lora_a": jnp.ones((3, 1))}})


# --- the fine-tuning proof -------------------------------------------------------------------


@pytest.mark.slow  # two short trainings: ~20 s on 2 cores
def test_a_lora_fine_tune_changes_only_the_adapters_and_merges_to_the_same_logits():
    example = digits_example()
    x_train, x_test, y_train, y_test = example.load_data()
    key = jax.random.key(0)

    model = example.ConvNet()
    init_fn, apply_fn = mx.transform(model)
    pretrained, _ = fit(apply_fn, init_fn(key), {}, x_train, y_train, optax.adam(3e-3), 150, key)
    pretrained_accuracy, _ = accuracy_of(apply_fn, pretrained, x_test, y_test)
    assert pretrained_accuracy > 0.85

    # A shifted task: the digits in negative. The pretrained model reads them poorly.
    shifted_train, shifted_test = 1.0 - x_train, 1.0 - x_test
    before, _ = accuracy_of(apply_fn, pretrained, shifted_test, y_test)

    adapted = mx.lora(model, rank=4)
    transformed = mx.transform(adapted)
    info = mx.variable_info(transformed)
    adapters, _ = mx.partition(transformed.init(jax.random.key(1)), LORA, info)
    variables = mx.combine(pretrained, adapters)  # the pretrained checkpoint, by path
    trainable, rest = mx.partition(variables, LORA, info)
    assert jax.tree.structure(rest) == jax.tree.structure(pretrained)
    trained, _ = fit(
        transformed.apply, trainable, rest, shifted_train, y_train, optax.adam(1e-2), 150, key
    )
    tuned = mx.combine(trained, rest)

    for path, array in mx.filter(tuned, ~LORA, info)["params"].items():  # bit-identical
        for name, value in array.items():
            np.testing.assert_array_equal(value, pretrained["params"][path][name])
    after, logits = accuracy_of(transformed.apply, tuned, shifted_test, y_test)
    assert after > before + 0.5, (before, after)

    plain, plain_variables = mx.merge_lora(adapted, tuned)
    assert jax.tree.structure(plain_variables) == jax.tree.structure(pretrained)
    merged_accuracy, merged_logits = accuracy_of(
        mx.apply(example.ConvNet()), plain_variables, shifted_test, y_test
    )
    assert_close(merged_logits, logits, n=1024, scale=np.abs(logits).max())
    assert merged_accuracy == after
