"""mx.Policy and mx.set_precision: the copy's dtypes (storage, computation, output), what stays
float32, the picks and every error; bfloat16 and float16 (with jmp's loss scaling) training of
the digits ConvNet against float32."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
import pytest
from _tolerance import assert_close

import metoryx as mx
from metoryx import errors

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from train_digits import ConvNet, load_data  # noqa: E402

HALF = mx.Policy(jnp.float32, jnp.bfloat16, jnp.float32)


def dtypes(tree):
    return jax.tree.map(lambda x: jnp.dtype(x.dtype).name, tree)


class Net(mx.Module):
    def __init__(self):
        self.conv = mx.Conv(1, 4, kernel_size=(3, 3))
        self.norm = mx.BatchNorm(4)
        self.head = mx.Dense(4, 3)

    def __call__(self, x, is_training=False):
        x = self.norm(mx.relu(self.conv(x)), is_training=is_training)
        return self.head(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------------------------------------
# Policy


def test_policy_holds_three_dtypes_and_output_defaults_to_compute():
    policy = mx.Policy("float32", jnp.float16)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.float16),
        jnp.dtype(jnp.float16),
    )
    assert policy == mx.Policy(jnp.float32, jnp.float16, jnp.float16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.compute_dtype = jnp.dtype(jnp.float32)  # type: ignore[misc]


@pytest.mark.parametrize(
    "argument, value",
    [("param_dtype", jnp.int32), ("compute_dtype", "nonsense"), ("output_dtype", object)],
)
def test_policy_refuses_a_dtype_that_is_not_floating(argument, value):
    given = {"param_dtype": jnp.float32, "compute_dtype": jnp.bfloat16, argument: value}
    with pytest.raises(errors.LayerConfigError, match=f"mx.Policy: `{argument}` must be a float"):
        mx.Policy(**given)


# ---------------------------------------------------------------------------------------------
# set_precision: dtypes


def test_whole_model_stores_in_param_dtype_computes_in_compute_dtype_outputs_in_output_dtype():
    model = Net()
    half = mx.set_precision(model, HALF)
    assert half.conv.dtype == half.head.dtype == jnp.bfloat16
    assert half.norm.dtype is None  # kept as built
    assert model.conv.dtype is None  # the original is untouched
    init_fn, apply_fn = mx.transform(half)
    variables = init_fn(jax.random.key(0))
    assert set(jax.tree.leaves(dtypes(variables))) == {"float32"}
    x = jnp.ones((2, 6, 6, 1))
    jaxpr = jax.make_jaxpr(lambda v: apply_fn(v, None, x, is_training=True))(variables)
    dots = [e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert [e.outvars[0].aval.dtype for e in dots] == [jnp.bfloat16] * 2
    y, _ = apply_fn(variables, None, x, is_training=True)
    assert y.dtype == jnp.float32


def test_half_storage_rebuilds_parameters_keeping_values_tags_axes_and_ties():
    shared = mx.Dense(3, 3)
    shared.kernel.value = jnp.full((3, 3), 1.0 / 3.0)
    shared.kernel.tags = ("backbone",)
    shared.kernel.axes = ("embed", "mlp")
    tied = mx.Sequential(shared, mx.relu, shared)  # one layer used twice: one variable
    half = mx.set_precision(tied, mx.Policy(jnp.bfloat16, jnp.bfloat16))
    kernel = half.layers[0].kernel
    assert half.layers[2] is half.layers[0]
    assert half.layers[0].dtype == jnp.bfloat16
    assert (kernel.dtype, kernel.tags, kernel.axes) == (
        jnp.dtype(jnp.bfloat16),
        ("backbone",),
        ("embed", "mlp"),
    )
    np.testing.assert_array_equal(kernel.value, jnp.full((3, 3), 1.0 / 3.0).astype(jnp.bfloat16))
    assert tied.layers[0].kernel.dtype == jnp.float32  # the original keeps its own
    variables = mx.init(half)(jax.random.key(0))
    assert list(variables["params"]["layers"]) == ["0"]  # still tied: one variable
    assert set(jax.tree.leaves(dtypes(variables))) == {"bfloat16"}


def test_normalizations_are_kept_unless_keep_says_otherwise():
    kept = mx.init(mx.set_precision(Net(), mx.Policy(jnp.bfloat16, jnp.bfloat16)))(
        jax.random.key(0)
    )
    assert dtypes(kept["params"]["norm"]) == {"bias": "float32", "scale": "float32"}
    assert dtypes(kept["batch_stats"]["norm"]) == {"mean": "float32", "var": "float32"}
    every = mx.set_precision(Net(), mx.Policy(jnp.bfloat16, jnp.bfloat16), keep=())
    assert every.norm.dtype == jnp.bfloat16
    assert dtypes(mx.init(every)(jax.random.key(0))["params"]["norm"])["scale"] == "bfloat16"
    only_head = mx.set_precision(Net(), mx.Policy(jnp.bfloat16, jnp.bfloat16), keep=(mx.Conv,))
    assert only_head.conv.dtype is None and only_head.head.dtype == jnp.bfloat16


def test_where_picks_by_class_glob_or_predicate_and_casts_each_picked_output():
    policy = mx.Policy(jnp.bfloat16, jnp.bfloat16, jnp.float32)
    for where in (mx.Dense, "head", lambda path, module: path == ("head",)):
        half = mx.set_precision(Net(), policy, where=where)
        assert half.head.dtype == jnp.bfloat16 and half.conv.dtype is None
        variables = mx.init(half)(jax.random.key(0))
        assert dtypes(variables["params"]["head"]) == {"bias": "bfloat16", "kernel": "bfloat16"}
        assert dtypes(variables["params"]["conv"])["kernel"] == "float32"
    _, apply_fn = mx.transform(half)
    y, _ = apply_fn(variables, None, jnp.ones((2, 5, 5, 1)))
    assert y.dtype == jnp.float32  # the head computes in bfloat16, outputs float32


def test_picked_layers_keep_their_class_and_are_not_wrapped_twice():
    once = mx.set_precision(mx.Dense(2, 2), HALF)
    twice = mx.set_precision(once, mx.Policy(jnp.float16, jnp.float16))
    assert isinstance(twice, mx.Dense) and type(twice).__name__ == "Dense"
    assert type(twice) is type(once)
    init_fn, apply_fn = mx.transform(twice)
    assert apply_fn(init_fn(jax.random.key(0)), None, jnp.ones(2))[0].dtype == jnp.float16


def test_output_cast_leaves_integers_alone():
    class Pair(mx.Module):
        def __init__(self):
            self.dense = mx.Dense(2, 2)

        def __call__(self, x):
            y = self.dense(x)
            return y, jnp.argmax(y, axis=-1)

    model = mx.set_precision(Pair(), HALF)
    init_fn, apply_fn = mx.transform(model)
    (y, index), _ = apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((3, 2)))
    assert (y.dtype, index.dtype) == (jnp.float32, jnp.int32)


def test_attention_and_its_cache_follow_the_policy():
    layer = mx.MultiHeadAttention(2, 8)
    half = mx.set_precision(layer, mx.Policy(jnp.bfloat16, jnp.bfloat16))
    assert half.param_dtype == jnp.bfloat16 and half.query.dtype == jnp.bfloat16
    half.init_cache(batch_shape=1, max_length=4)
    variables = mx.init(half)(jax.random.key(0))
    assert set(jax.tree.leaves(dtypes(variables["params"]))) == {"bfloat16"}
    assert dtypes(variables["cache"])["cached_key"] == "bfloat16"


def test_a_jmp_policy_is_accepted():
    policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
    half = mx.set_precision(mx.Dense(2, 2), policy)
    assert half.dtype == jnp.bfloat16 and half.output_dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# set_precision: errors


def test_a_where_that_picks_nothing_lists_the_near_misses():
    with pytest.raises(errors.NoMatchError, match="mx.set_precision: .*closest paths: head"):
        mx.set_precision(Net(), HALF, where="haed")
    with pytest.raises(errors.NoMatchError, match="no module is a LayerNorm; the model holds"):
        mx.set_precision(Net(), HALF, where=mx.LayerNorm)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"policy": "bfloat16"}, "`policy` must be an mx.Policy"),
        ({"policy": HALF, "where": 3}, "mx.set_precision: `where` must be a module class"),
        ({"policy": HALF, "where": "a//b"}, "mx.set_precision: `where` is not a path glob"),
        ({"policy": HALF, "keep": mx.BatchNorm}, "`keep` must be a tuple of module classes"),
        ({"policy": HALF, "keep": (int,)}, "`keep` must be a tuple of module classes"),
    ],
)
def test_bad_arguments_say_what_to_pass(arguments, message):
    with pytest.raises(errors.LayerConfigError, match=message):
        mx.set_precision(Net(), **arguments)


# ---------------------------------------------------------------------------------------------
# Attention: half-precision scores, float32 softmax


@pytest.mark.parametrize("offset", [0, 2])  # 0: JAX's own top-left mask, 2: ours
@pytest.mark.parametrize("dropout_rate", [0.0, 0.5])
def test_attention_keeps_bfloat16_scores_and_runs_only_the_softmax_in_float32(dropout_rate, offset):
    q = jnp.sin(jnp.arange(2 * 5 * 4 * 8.0)).reshape(2, 5, 4, 8)
    kv = jnp.cos(jnp.arange(2 * 7 * 2 * 8.0)).reshape(2, 7, 2, 8)

    def attend(q, k, v):
        rng = jax.random.key(0)
        return mx.dot_product_attention(
            q, k, v, is_causal=True, causal_offset=offset, rng=rng, dropout_rate=dropout_rate
        )

    half = [a.astype(jnp.bfloat16) for a in (q, kv, kv)]
    jaxpr = jax.make_jaxpr(attend)(*half)
    scores = [e for e in jaxpr.eqns if e.outvars and e.outvars[0].aval.shape[-2:] == (5, 7)]
    in_float32 = {e.primitive.name for e in scores if e.outvars[0].aval.dtype == jnp.float32}
    # float32 score-shaped values exist only inside the softmax: the upcast, then its max,
    # subtraction, exponential and normalization (JAX 0.12 keeps the softmax as one
    # custom_jvp_call).
    assert in_float32 <= {
        "custom_jvp_call",
        "convert_element_type",
        "sub",
        "exp",
        "div",
        "broadcast_in_dim",
        "stop_gradient",
        "max",
        "reduce_max",
        "reduce_sum",
    }
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)
    out = attend(*half)
    assert out.dtype == jnp.bfloat16
    if dropout_rate == 0.0:
        # Against float32 attention on the same (rounded) inputs: a bfloat16 rounding of the
        # 8-term logits, of the weights and of the 7-term products.
        reference = attend(*(a.astype(jnp.float32) for a in half))
        assert_close(out, reference, n=8 + 7, k=8.0, dtype=jnp.bfloat16)


# ---------------------------------------------------------------------------------------------
# The proof: the digits ConvNet in bfloat16 and float16


def train_digits(policy, steps=300, loss_scale=None):
    """Train examples/train_digits.py's ConvNet for ``steps`` steps (batch 64, Adam 3e-3 with
    cosine decay, seeds fixed) under ``policy``; the test accuracy and the losses."""
    x_train, x_test, y_train, y_test = load_data()
    model = ConvNet() if policy is None else mx.set_precision(ConvNet(), policy)
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def train_step(variables, opt_state, loss_scale, rng, x, y):
        def loss_fn(params):
            logits, _ = apply_fn({**variables, "params": params}, rng, x, is_training=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return (loss if loss_scale is None else loss_scale.scale(loss)), loss

        grads, loss = jax.grad(loss_fn, has_aux=True)(variables["params"])
        finite = jnp.asarray(True)
        if loss_scale is not None:
            grads = loss_scale.unscale(grads)
            finite = jmp.all_finite(grads)
            loss_scale = loss_scale.adjust(finite)
        updates, new_opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        # A step whose gradients overflowed is skipped: the scale drops and the step retries.
        params, opt_state = jmp.select_tree(
            finite, (params, new_opt_state), (variables["params"], opt_state)
        )
        return {**variables, "params": params}, opt_state, loss_scale, loss

    rng = np.random.default_rng(0)
    dropout_key = jax.random.key(1)
    losses = []
    for step in range(steps):
        batch = rng.choice(len(x_train), 64, replace=False)
        step_key = jax.random.fold_in(dropout_key, step)
        variables, opt_state, loss_scale, loss = train_step(
            variables, opt_state, loss_scale, step_key, x_train[batch], y_train[batch]
        )
        losses.append(float(loss))
    logits, _ = jax.jit(apply_fn)(variables, None, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
    return accuracy, np.asarray(losses), loss_scale


@pytest.mark.slow
@jax.numpy_dtype_promotion("standard")  # the users' mode: optax's schedules and jmp's adjust
def test_bfloat16_training_reaches_the_float32_accuracy_and_float16_with_loss_scaling_too():
    # (mix ints with floats and bools, which the suite's strict promotion refuses)
    float32, float32_losses, _ = train_digits(None)
    bfloat16, bfloat16_losses, _ = train_digits(HALF)
    start = jmp.DynamicLossScale(jnp.asarray(2.0**15, jnp.float32), period=50)
    float16, float16_losses, scale = train_digits(
        mx.Policy(jnp.float32, jnp.float16, jnp.float32), loss_scale=start
    )
    assert float32 > 0.95  # a trained model: the comparison means something
    assert abs(bfloat16 - float32) <= 0.01, (bfloat16, float32)
    assert np.isfinite(float16_losses).all() and np.isfinite(bfloat16_losses).all()
    assert abs(float16 - float32) <= 0.01, (float16, float32)
    assert float16_losses[-50:].mean() < float16_losses[:50].mean() / 5
    assert float(scale.loss_scale) >= 1.0
