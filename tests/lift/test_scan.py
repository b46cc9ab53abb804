"""mx.Repeat and mx.scan against the unrolled computation: init, values, gradients, State, rngs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py
from trees import assert_trees_equal  # tests/lift/trees.py

import metoryx as mx
from metoryx import errors
from metoryx._core.rng import fold_in_path

D = 4
X = jnp.linspace(-1.0, 1.0, 3 * D).reshape(3, D)


class Block(mx.Module):
    """A residual block with parameters, batch statistics and dropout."""

    def __init__(self, rate=0.0):
        self.fc = mx.Dense(D, D)
        self.norm = mx.BatchNorm(D)
        self.rate = rate

    def __call__(self, x, is_training=False):
        h = self.norm(self.fc(x), is_training=is_training)
        return x + mx.dropout(jnp.tanh(h), self.rate, is_training=is_training)


class Stacked(mx.Module):
    def __init__(self, n=3, rate=0.0, **options):
        self.blocks = mx.Repeat(lambda: Block(rate), n, **options)

    def __call__(self, x, is_training=False):
        return self.blocks(x, is_training=is_training)


class Unrolled(mx.Module):
    def __init__(self, n=3):
        self.blocks = [Block() for _ in range(n)]

    def __call__(self, x, is_training=False):
        for block in self.blocks:
            x = block(x, is_training=is_training)
        return x


def test_repeat_stacks_variables_and_inits_each_copy_as_the_unrolled_model():
    model = Stacked()
    variables = mx.init(model)(jax.random.key(0))
    assert variables["params"]["blocks"]["fc"]["kernel"].shape == (3, D, D)
    assert variables["batch_stats"]["blocks"]["norm"]["mean"].shape == (3, D)
    unrolled = mx.init(Unrolled())(jax.random.key(0))
    assert_trees_equal(mx.unstack(model, variables), unrolled)
    kernels = variables["params"]["blocks"]["fc"]["kernel"]
    assert not np.array_equal(kernels[0], kernels[1])  # each copy has its own start
    assert_trees_equal(mx.stack(model, unrolled), variables)


def test_repeat_dropout_masks_differ_per_copy_and_repeat_per_run():
    model = mx.Repeat(lambda: mx.Dropout(0.5), 2)
    apply_fn = jax.jit(mx.apply(model), static_argnames="is_training")
    ones = jnp.ones((2, 64))
    y, _ = apply_fn({}, jax.random.key(0), ones, is_training=True)
    z, _ = apply_fn({}, jax.random.key(0), ones, is_training=True)
    np.testing.assert_array_equal(y, z)
    # Two different masks compose: about a quarter of the units survive both, scaled by 4.
    assert set(np.unique(y).tolist()) <= {0.0, 4.0}
    assert 0.1 < float(jnp.mean(y > 0)) < 0.4


def test_repeat_under_jit_init_draws_the_same_bits_as_eager():
    init_fn = mx.init(Stacked())
    # The same draws; the normal sampler may round its last bits apart in the jitted program.
    assert_trees_equal(jax.jit(init_fn)(jax.random.key(3)), init_fn(jax.random.key(3)), False, n=1)


@pytest.mark.parametrize("options", [{}, {"remat": True}, {"unroll": 2}], ids=str)
def test_repeat_equals_the_unrolled_model_values_gradients_and_state(options):
    stacked, unrolled = Stacked(**options), Unrolled()
    variables = mx.init(stacked)(jax.random.key(0))
    flat = mx.unstack(stacked, variables)
    apply_s = mx.apply(stacked)
    apply_u = mx.apply(unrolled)

    def loss(params, apply_fn, variables):
        out, new = apply_fn({**variables, "params": params}, None, X, is_training=True)
        return jnp.sum(out**2), new

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ls, new_s), gs = step(variables["params"], apply_s, variables)
    (lu, new_u), gu = step(flat["params"], apply_u, flat)
    # The loop and the unrolled program round differently (XLA fuses and orders their sums
    # apart): ~100 roundings along the way (3 blocks of a 4-term dot, 3-sample statistics and
    # tanh, forward and backward, and the 12-term loss). The fc biases' gradients are 0 in
    # exact math (BatchNorm cancels a bias), so only their neighbours' scale bounds them.
    assert_close(ls, lu, n=100)
    assert_trees_equal(mx.unstack(stacked, {"params": gs})["params"], gu, exact=False, n=100)
    # Each copy's batch statistics were updated with that copy's own batch.
    assert_trees_equal(
        mx.unstack(stacked, new_s)["batch_stats"], new_u["batch_stats"], exact=False, n=100
    )
    assert not np.allclose(new_s["batch_stats"]["blocks"]["norm"]["mean"], 0.0)


def test_repeat_compiles_one_body_whatever_the_number_of_copies():
    def program(n):
        model = Stacked(n)
        variables = mx.init(model)(jax.random.key(0))
        return jax.make_jaxpr(lambda v: mx.apply(model)(v, None, X)[0])(variables)

    small, large = program(2), program(16)
    assert [e.primitive.name for e in small.eqns] == [e.primitive.name for e in large.eqns]
    (scan,) = [e for e in large.eqns if e.primitive.name == "scan"]
    assert scan.params["length"] == 16


def test_repeat_remat_puts_a_checkpoint_in_the_loop_body():
    model = Stacked(remat=True, policy=jax.checkpoint_policies.nothing_saveable)
    variables = mx.init(model)(jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda v: mx.apply(model)(v, None, X)[0])(variables)
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    body = [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns]
    assert body == ["checkpoint"] or "remat" in str(body) or "checkpoint" in body


class Noise(mx.Module):
    """Adds noise from stream "noise" and counts its calls: keys and State per copy."""

    def __init__(self):
        self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

    def __call__(self, x):
        self.calls = self.calls + 1
        return x + jax.random.normal(mx.next_rng_key("noise"), x.shape)


def test_repeat_gives_each_copy_its_own_keys_by_the_documented_rule():
    model = mx.Repeat(Noise, 3)
    init_fn, apply_fn = mx.transform(model)
    root = jax.random.key(7)
    zeros = jnp.zeros((3, 2))
    y, new = jax.jit(apply_fn)(init_fn(0), root, zeros)
    # Copy i draws fold_in(fold_in(k, i), 0), with k the key the caller would draw next.
    k = jax.random.fold_in(fold_in_path(root, ("stream", "noise")), 0)
    expected = zeros
    for i in range(3):
        expected = expected + jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(k, i), 0), (3, 2)
        )
    assert_close(y, expected, n=3)  # 3 draws summed, in the loop and here
    np.testing.assert_array_equal(new["counters"]["calls"], [1, 1, 1])
    again, _ = apply_fn(init_fn(0), root, zeros)
    np.testing.assert_array_equal(again, y)  # the same keys on every run


def test_repeat_shared_rngs_give_every_copy_the_same_keys():
    model = mx.Repeat(Noise, 2, split_rngs=False)
    init_fn, apply_fn = mx.transform(model)
    y, _ = apply_fn(init_fn(0), jax.random.key(1), jnp.zeros(5))
    once, _ = mx.transform(Noise()).apply(
        {"counters": {"calls": 0}}, jax.random.key(1), jnp.zeros(5)
    )
    assert_close(y, 2 * once, n=2)


def test_keys_after_a_repeat_differ_from_the_ones_inside():
    class Net(mx.Module):
        def __init__(self):
            self.blocks = mx.Repeat(Noise, 2)
            self.after = Noise()

        def __call__(self, x):
            inside = self.blocks(x)
            return inside, self.after(x)

    init_fn, apply_fn = mx.transform(Net())
    (inside, after), _ = apply_fn(init_fn(0), jax.random.key(0), jnp.zeros(4))
    first_copy = jax.random.normal(
        jax.random.fold_in(
            jax.random.fold_in(
                jax.random.fold_in(fold_in_path(jax.random.key(0), ("stream", "noise")), 0), 0
            ),
            0,
        ),
        (4,),
    )
    assert not np.allclose(after, first_copy)
    # The layer after the Repeat draws the caller's second key: the first went into the loop.
    second = jax.random.fold_in(fold_in_path(jax.random.key(0), ("stream", "noise")), 1)
    # Eager: the very sampler program of this call, added to zeros.
    np.testing.assert_array_equal(after, jax.random.normal(second, (4,)))


class Scaled(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(D, D)

    def __call__(self, x, scale, shift=0.0):
        return jnp.tanh(self.fc(x)) * scale + shift


def test_repeat_scans_per_layer_inputs_and_passes_keywords_to_every_copy():
    model = mx.Repeat(Scaled, 3)
    variables = mx.init(model)(jax.random.key(0))
    scales = jnp.array([0.5, 1.0, 2.0])
    y, _ = jax.jit(mx.apply(model))(variables, None, X, scales, shift=0.1)
    expected = X
    for i, layer in enumerate(mx.unstack(model, variables)["params"].values()):
        h = jnp.tanh(jnp.dot(expected, layer["fc"]["kernel"]) + layer["fc"]["bias"][None])
        expected = h * scales[i] + 0.1
    assert_close(y, expected, n=20)  # 3 layers of a 4-term dot, bias, tanh, scale and shift


def test_a_kv_cache_per_layer_decodes_token_by_token_as_the_full_causal_pass():
    class Attend(mx.Module):
        def __init__(self):
            self.attn = mx.MultiHeadAttention(2, D)

        def __call__(self, x, decode=False):
            return x + self.attn(x, is_causal=True, decode=decode)

    model = mx.Repeat(Attend, 2)
    tokens = jax.random.normal(jax.random.key(1), (1, 5, D))
    variables = mx.init(model)(jax.random.key(0))
    full, _ = mx.apply(model)(variables, None, tokens)

    decoder = mx.assign_variables(model, variables)
    decoder.module.attn.init_cache(batch_shape=1, max_length=5)
    init_fn, apply_fn = mx.transform(decoder)
    state = init_fn(jax.random.key(0))
    assert state["cache"]["attn"]["cached_key"].shape[:2] == (2, 1)  # a cache per layer
    step = jax.jit(lambda v, t: apply_fn(v, None, t, decode=True))
    outs = []
    for t in range(5):
        y, state = step(state, tokens[:, t : t + 1])
        outs.append(y)
    # 2 layers of projections (4-term dots), a softmax over up to 5 keys and the output
    # projection, summed in other orders token by token than in the full pass.
    assert_close(jnp.concatenate(outs, axis=1), full, n=50)
    np.testing.assert_array_equal(state["cache"]["attn"]["cache_index"], [5, 5])


def test_nested_repeats_stack_two_axes_and_unstack_to_nested_lists():
    class Inner(mx.Module):
        def __init__(self):
            self.layers = mx.Repeat(lambda: mx.Dense(D, D), 2)

        def __call__(self, x):
            return self.layers(x)

    class Nested(mx.Module):
        def __init__(self):
            self.groups = mx.Repeat(Inner, 3)

        def __call__(self, x):
            return self.groups(x)

    class Lists(mx.Module):
        def __init__(self):
            self.groups = [ListInner() for _ in range(3)]

        def __call__(self, x):
            for group in self.groups:
                for layer in group.layers:
                    x = layer(x)
            return x

    class ListInner(mx.Module):
        def __init__(self):
            self.layers = [mx.Dense(D, D) for _ in range(2)]

    variables = mx.init(Nested())(jax.random.key(0))
    assert variables["params"]["groups"]["layers"]["kernel"].shape == (3, 2, D, D)
    flat = mx.unstack(Nested(), variables)
    assert_trees_equal(flat, mx.init(Lists())(jax.random.key(0)))
    y, _ = mx.apply(Nested())(variables, None, X)
    expected, _ = mx.apply(Lists())(flat, None, X)
    assert_close(y, expected, n=30)  # 6 layers of a 4-term dot and the bias


def test_repeat_of_a_layer_with_a_fixed_value_starts_every_copy_from_it():
    layer = mx.Dense(D, D)
    layer.kernel.value = jnp.eye(D)
    variables = mx.init(mx.Repeat(layer, 3))(jax.random.key(0))
    np.testing.assert_array_equal(
        variables["params"]["kernel"], jnp.broadcast_to(jnp.eye(D), (3, D, D))
    )


def test_assign_variables_keeps_trained_stacked_values():
    model = Stacked()
    variables = mx.init(model)(jax.random.key(0))
    trained = jax.tree.map(lambda a: a + 1, variables)
    again = mx.init(mx.assign_variables(model, trained))(jax.random.key(9))
    assert_trees_equal(again, trained)


def test_print_shows_the_copies_and_counts_every_copy():
    text = repr(mx.Repeat(lambda: mx.Dense(D, D), 3))
    assert text.splitlines()[0] == "Repeat("
    assert "n=3" in text and "Dense(" in text
    assert text.splitlines()[-1] == "Total: 60 parameters (240 B)"


# -- mx.scan -----------------------------------------------------------------------------------


class Cell(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(D, D)
        self.steps = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

    def __call__(self, h, x):
        self.steps = self.steps + 1
        h = jnp.tanh(self.fc(h) + x)
        return h, 2 * h


class Scanned(mx.Module):
    def __init__(self, **options):
        self.cell = mx.scan(Cell(), **options)

    def __call__(self, xs):
        return self.cell(jnp.zeros(D), xs)


XS = jnp.linspace(-1.0, 1.0, 5 * D).reshape(5, D)


def loop(params, xs, reverse=False):
    """The scan written as a Python loop in plain JAX."""
    h, ys = jnp.zeros(D), [None] * len(xs)
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    for t in order:
        p = params if "kernel" in params else params[str(t)]
        h = jnp.tanh(jnp.dot(h, p["kernel"]) + p["bias"] + xs[t])
        ys[t] = 2 * h
    return h, jnp.stack(ys)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_with_shared_parameters_equals_a_loop_and_carries_state(reverse):
    model = Scanned(reverse=reverse)
    variables = mx.init(model)(jax.random.key(0))
    assert variables["params"]["cell"]["fc"]["kernel"].shape == (D, D)

    def loss(params):
        (h, ys), new = mx.apply(model)({**variables, "params": params}, None, XS)
        return jnp.sum(ys) + jnp.sum(h), (h, ys, new)

    (_, (h, ys, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    h_ref, ys_ref = loop(variables["params"]["cell"]["fc"], XS, reverse)
    # 5 steps of a 4-term dot, the bias, the input and tanh; twice that back for gradients.
    assert_close(h, h_ref, n=30)
    assert_close(ys, ys_ref, n=30)
    assert int(new["counters"]["cell"]["steps"]) == 5  # carried from step to step
    ref_grads = jax.grad(lambda p: sum(map(jnp.sum, loop(p, XS, reverse))))(
        variables["params"]["cell"]["fc"]
    )
    assert_trees_equal(grads["cell"]["fc"], ref_grads, exact=False, n=60)


def test_scan_with_stacked_parameters_uses_one_copy_per_step():
    model = Scanned(length=5, variable_axes={"params": 0})
    variables = mx.init(model)(jax.random.key(0))
    assert variables["params"]["cell"]["fc"]["kernel"].shape == (5, D, D)
    (h, ys), _ = mx.apply(model)(variables, None, XS)
    per_step = mx.unstack(model, variables)["params"]["cell"]
    h_ref, ys_ref = loop({t: per_step[t]["fc"] for t in per_step}, XS)
    assert_close(ys, ys_ref, n=30)


def test_scan_errors_name_the_wrapper_and_the_fix():
    with pytest.raises(errors.LayerConfigError, match="length"):
        mx.scan(Cell(), variable_axes={"params": 0})
    with pytest.raises(errors.LayerConfigError, match="0 .stacked. or None"):
        mx.scan(Cell(), length=2, variable_axes={"params": 1})
    model = Scanned(length=4)
    with pytest.raises(
        errors.InputShapeError, match="Scan at 'cell'.*4 steps.*leading sizes are \\[5\\]"
    ):
        mx.apply(model)(mx.init(model)(0), None, XS)


def test_repeat_errors_name_the_layer_and_the_fix():
    with pytest.raises(errors.LayerConfigError, match="positive int"):
        mx.Repeat(Block, 0)
    with pytest.raises(errors.LayerConfigError, match="mx.Module"):
        mx.Repeat(lambda: 3, 2)
    grow = mx.Repeat(lambda: mx.Dense(D, 2 * D), 2)
    with pytest.raises(errors.InputShapeError, match="Repeat.*like its input"):
        mx.apply(grow)(mx.init(grow)(0), None, X)
    scaled = mx.Repeat(Scaled, 3)
    with pytest.raises(errors.InputShapeError, match="Repeat.*3 steps.*leading sizes are \\[2\\]"):
        mx.apply(scaled)(mx.init(scaled)(0), None, X, jnp.ones((2, 1)))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mx.Repeat(len, 2), "function of no arguments.*takes arguments"),
        (lambda: mx.Repeat(lambda d: mx.Dense(d, d), 2), "function of no arguments"),
        (lambda: mx.Repeat(Block, 2, unroll=0), "`unroll` must be a positive int .* or a bool"),
        (lambda: mx.Repeat(Block, 2, unroll=1.5), "`unroll`.*1.5"),
        (lambda: mx.Repeat(Block, 2, policy="dots"), "`policy` must be None"),
        (lambda: mx.scan(Cell(), length=2, unroll="2"), "`unroll`.*'2'"),
        (lambda: mx.scan(Cell(), length=2, policy=3), "`policy` must be None"),
        # Found by tests/test_bad_arguments.py: init_fn listed 2**70 copy paths, a MemoryError.
        (lambda: mx.Repeat(Block, 2**70), "below 2\\*\\*63.*1180591620717411303424"),
        (lambda: mx.scan(Cell(), length=2**63), "below 2\\*\\*63"),
    ],
)
def test_bad_options_of_repeat_and_scan_are_named_at_construction(make, match):
    with pytest.raises(errors.LayerConfigError, match=match):
        make()


def test_unroll_takes_ints_and_bools():
    assert mx.Repeat(Block, 2, unroll=True).unroll is True
    assert mx.scan(Cell(), length=2, unroll=np.int64(2)).unroll == 2


def test_a_module_cannot_be_shared_across_a_repeat():
    shared = mx.Dense(D, D)

    class Net(mx.Module):
        def __init__(self):
            self.blocks = mx.Repeat(shared, 2)
            self.head = shared

    with pytest.raises(errors.ModuleStructureError, match="other side of a lifted wrapper"):
        mx.transform(Net())


def test_raw_lax_scan_in_module_code_cannot_draw_keys_or_assign_state():
    class Leaky(mx.Module):
        def __init__(self):
            self.noise = Noise()

        def __call__(self, xs):
            return jax.lax.scan(lambda c, x: (c, self.noise(x)), 0.0, xs)[1]

    init_fn, apply_fn = mx.transform(Leaky())
    with pytest.raises(errors.TransformBoundaryError, match="Noise at 'noise'.*mx.scan"):
        apply_fn(init_fn(0), jax.random.key(0), XS)
