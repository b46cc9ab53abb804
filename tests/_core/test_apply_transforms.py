"""init_fn and apply_fn under JAX transformations: jit, grad, vmap, scan, checkpoint, eval_shape.

Every comparison is against the same math written by hand in plain JAX with the same arrays.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close, assert_trees_close  # tests/_tolerance.py
from jax import lax

import metoryx as mx


class MLP(mx.Module):
    def __init__(self):
        self.fc1 = mx.Dense(3, 4)
        self.fc2 = mx.Dense(4, 2)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def hand_mlp(p, x):
    """The same 2-layer MLP written in plain JAX."""
    with jax.numpy_rank_promotion("allow"):
        h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


class Stateful(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(3, 4)
        self.steps = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.mean = mx.State("batch_stats", mx.initializers.zeros, (4,))

    def __call__(self, x, is_training=False):
        y = self.fc(x)
        self.steps = self.steps + 1
        self.mean = 0.9 * self.mean + 0.1 * jnp.mean(y, axis=0)
        return mx.dropout(y, 0.5, is_training=is_training)


X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
T = jnp.array([[0.5, -0.5], [1.0, 0.0]])


# Two programs for the same math (eager against jitted, batched against single, a loop against
# its steps, hand-written against ours) may sum and fuse in other orders: their results are
# compared within tests/_tolerance.py's bound for N roundings. The MLP's longest chain: a 3-term
# dot, tanh, a 4-term dot, and for gradients the same back, with a 4-element mean: ~20.
N = 20


def primitives(jaxpr):
    """The primitive names of a jaxpr, descending into sub-jaxprs (jit, checkpoint, scan)."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                names += primitives(inner)
    return names


# ---------------------------------------------------------------------------------------------
# init_fn


def test_init_under_jit_equals_eager():
    init_fn = mx.init(MLP())
    # The same draws, through the normal sampler's polynomial, whose multiply-adds XLA may
    # fuse otherwise in the jitted program than in the eager one: equal to a few ulps.
    assert_trees_close(jax.jit(init_fn)(jax.random.key(0)), init_fn(jax.random.key(0)))


def test_abstract_init_of_a_20_gb_model_allocates_nothing():
    class Huge(mx.Module):
        def __init__(self):
            self.a = mx.Dense(50_000, 50_000)
            self.b = mx.Dense(50_000, 50_000)

        def __call__(self, x):
            return self.b(self.a(x))

    init_fn, apply_fn = mx.transform(Huge())
    start = time.perf_counter()
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    assert time.perf_counter() - start < 30
    assert isinstance(shapes["params"]["a"]["kernel"], jax.ShapeDtypeStruct)
    assert shapes["params"]["b"]["kernel"].shape == (50_000, 50_000)
    assert shapes["params"]["b"]["bias"].dtype == jnp.float32
    out, new = jax.eval_shape(
        apply_fn, shapes, None, jax.ShapeDtypeStruct((1, 50_000), jnp.float32)
    )
    assert out.shape == (1, 50_000)
    assert jax.tree.structure(new) == jax.tree.structure(shapes)


def test_vmap_over_keys_makes_an_ensemble():
    init_fn = mx.init(MLP())
    keys = jax.random.split(jax.random.key(0), 4)
    ensemble = jax.jit(jax.vmap(init_fn))(keys)
    assert ensemble["params"]["fc1"]["kernel"].shape == (4, 3, 4)
    assert ensemble["params"]["fc2"]["bias"].shape == (4, 2)
    kernels = ensemble["params"]["fc1"]["kernel"]
    assert len({bytes(np.asarray(k).data) for k in kernels}) == 4
    # The same draws; the normal sampler may round its last bit apart in the batched program.
    assert_trees_close(jax.tree.map(lambda a: a[2], ensemble), init_fn(keys[2]))


# ---------------------------------------------------------------------------------------------
# apply_fn


def test_apply_equals_the_hand_written_mlp():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    y, _ = apply_fn(v, None, X)
    assert_close(y, hand_mlp(v["params"], X), n=N)


def test_jit_equals_eager_with_state_and_dropout():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    key = jax.random.key(1)
    eager = apply_fn(v, key, X, is_training=True)
    jitted = jax.jit(apply_fn, static_argnames="is_training")(v, key, X, is_training=True)
    assert_trees_close(eager, jitted, n=N)
    assert int(jitted[1]["counters"]["steps"]) == 1
    assert jax.tree.structure(jitted[1]) == jax.tree.structure(v)


def test_grad_through_params_equals_the_hand_written_gradient():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)

    def loss(params):
        y, _ = apply_fn({"params": params}, None, X)
        return jnp.mean((y - T) ** 2)

    def hand_loss(params):
        return jnp.mean((hand_mlp(params, X) - T) ** 2)

    ours = jax.jit(jax.grad(loss))(v["params"])
    theirs = jax.jit(jax.grad(hand_loss))(v["params"])
    assert_trees_close(ours, theirs, n=N)


def test_vmap_over_inputs():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    xs = jnp.stack([X, 2 * X, -X])
    ys, _ = jax.vmap(apply_fn, in_axes=(None, None, 0))(v, None, xs)
    assert ys.shape == (3, 2, 2)
    for i in range(3):
        assert_close(ys[i], hand_mlp(v["params"], xs[i]), n=N)


def test_vmap_over_inputs_with_state_batches_the_state():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    xs = jnp.stack([X, 2 * X])
    _, new = jax.vmap(apply_fn, in_axes=(None, None, 0))(v, None, xs)
    assert new["batch_stats"]["mean"].shape == (2, 4)
    assert_close(
        new["batch_stats"]["mean"][1], apply_fn(v, None, 2 * X)[1]["batch_stats"]["mean"], n=N
    )


def test_vmap_over_variables_runs_an_ensemble():
    init_fn, apply_fn = mx.transform(MLP())
    ensemble = jax.vmap(init_fn)(jax.random.split(jax.random.key(0), 4))
    ys, _ = jax.jit(jax.vmap(apply_fn, in_axes=(0, None, None)))(ensemble, None, X)
    assert ys.shape == (4, 2, 2)
    for i in range(4):
        member = jax.tree.map(lambda a: a[i], ensemble)  # noqa: B023
        assert_close(ys[i], hand_mlp(member["params"], X), n=N)
    assert not np.allclose(ys[0], ys[1])


def _sgd_step(apply_fn):
    def step(variables, batch):
        x, t = batch

        def loss(params):
            y, new = apply_fn({**variables, "params": params}, None, x)
            return jnp.mean((y - t) ** 2), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {**new, "params": params}, value

    return step


def test_lax_scan_training_loop_equals_a_python_loop():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    xs = jnp.stack([X * (i + 1) for i in range(5)])
    ts = jnp.stack([jnp.full((2, 4), 0.1 * i) for i in range(5)])
    step = _sgd_step(apply_fn)

    scanned, losses = jax.jit(lambda v: lax.scan(step, v, (xs, ts)))(v)
    looped, looped_losses = v, []
    jitted_step = jax.jit(step)
    for i in range(5):
        looped, value = jitted_step(looped, (xs[i], ts[i]))
        looped_losses.append(value)

    assert jax.tree.structure(scanned) == jax.tree.structure(v)
    assert int(scanned["counters"]["steps"]) == 5
    # Five steps, each rounding ~N times and starting from the last one's rounded parameters.
    assert_trees_close(scanned, looped, n=5 * N)
    assert_close(losses, jnp.stack(looped_losses), n=5 * N)
    assert losses[-1] < losses[0] or not np.allclose(losses, losses[0])


def test_checkpoint_of_apply_gives_the_same_gradient():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)

    def loss(params, x):
        return jnp.sum(apply_fn({"params": params}, None, x)[0] ** 2)

    remat = jax.checkpoint(loss)
    grads = jax.jit(jax.grad(remat))(v["params"], X)
    assert_trees_close(grads, jax.jit(jax.grad(loss))(v["params"], X), n=N)
    names = primitives(jax.make_jaxpr(jax.grad(remat))(v["params"], X).jaxpr)
    assert any(name in ("checkpoint", "remat", "remat2") for name in names)


def test_checkpoint_with_state():
    init_fn, apply_fn = mx.transform(Stateful())
    v = init_fn(0)
    out, new = jax.checkpoint(lambda v, x: apply_fn(v, None, x))(v, X)
    assert_trees_close((out, new), apply_fn(v, None, X), n=N)


def test_eval_shape_of_apply():
    init_fn, apply_fn = mx.transform(Stateful())
    out, new = jax.eval_shape(apply_fn, jax.eval_shape(init_fn, jax.random.key(0)), None, X)
    assert out.shape == (2, 4) and new["counters"]["steps"].dtype == jnp.int32


def test_jitted_forward_jaxpr_equals_the_hand_written_one():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)
    ours = jax.make_jaxpr(jax.jit(lambda v, x: apply_fn(v, None, x)[0]))(v, X)
    theirs = jax.make_jaxpr(jax.jit(lambda v, x: hand_mlp(v["params"], x)))(v, X)
    assert primitives(ours.jaxpr) == primitives(theirs.jaxpr)
    assert len(ours.jaxpr.eqns[0].params["jaxpr"].eqns) == len(
        theirs.jaxpr.eqns[0].params["jaxpr"].eqns
    )
    assert str(ours) == str(theirs)  # the very same program


def test_jitted_train_step_jaxpr_equals_the_hand_written_one():
    init_fn, apply_fn = mx.transform(MLP())
    v = init_fn(0)

    def hand_apply(variables, rngs, x):
        return hand_mlp(variables["params"], x), variables

    ours = jax.make_jaxpr(jax.jit(_sgd_step(apply_fn)))(v, (X, T))
    theirs = jax.make_jaxpr(jax.jit(_sgd_step(hand_apply)))(v, (X, T))
    assert primitives(ours.jaxpr) == primitives(theirs.jaxpr)


# ---------------------------------------------------------------------------------------------
# Inside module code: plain arrays


def _array_ops(w, x):
    """A grab bag of jnp/lax calls that must accept a Parameter read inside module code."""
    return [
        jnp.tanh(w),
        jnp.einsum("bi,ij->bj", x, w),
        jnp.linalg.norm(w),
        x @ w,
        w @ x.T,
        lax.dot(x, w),
        w.T,
        w[0],
        jnp.where(w > 0, w, 0.0),
        jnp.stack([w, w]),
        w * 2.0,
        jnp.asarray(w),
    ]


class Probe(mx.Module):
    def __init__(self):
        self.w = mx.Parameter(mx.initializers.normal(), (3, 3))
        self.stat = mx.State("stats", mx.initializers.ones, (3,))

    def __call__(self, x):
        assert isinstance(self.w, jax.Array) and isinstance(self.stat, jax.Array)
        assert self.w.shape == (3, 3) and self.w.dtype == jnp.float32
        return _array_ops(self.w, x) + [self.stat * 1.0]


@pytest.mark.parametrize("jit", [False, True])
def test_parameters_read_as_plain_arrays_that_every_jnp_function_accepts(jit):
    init_fn, apply_fn = mx.transform(Probe())
    v = init_fn(0)
    x = jnp.arange(6.0).reshape(2, 3)
    fn = jax.jit(apply_fn) if jit else apply_fn
    outs, _ = fn(v, None, x)
    expected = _array_ops(v["params"]["w"], x) + [v["stats"]["stat"]]
    for a, b in zip(outs, expected, strict=True):  # at most a 3-term sum or a tanh each
        assert_close(a, b, n=3)


def test_plain_array_also_under_grad_and_vmap():
    init_fn, apply_fn = mx.transform(Probe())
    v = init_fn(0)
    x = jnp.ones((2, 3))
    grads = jax.jit(jax.grad(lambda v: jnp.sum(apply_fn(v, None, x)[0][0])))(v)
    assert_close(grads["params"]["w"], 1 - jnp.tanh(v["params"]["w"]) ** 2, n=3)
    outs, _ = jax.jit(jax.vmap(apply_fn, in_axes=(None, None, 0)))(v, None, jnp.stack([x, x]))
    assert outs[3].shape == (2, 2, 3)


# ---------------------------------------------------------------------------------------------
# Weight tying


def test_tied_module_is_stored_once_and_its_gradient_sums_both_uses():
    class Twice(mx.Module):
        def __init__(self):
            self.proj = mx.Dense(4, 4)
            self.blocks = [self.proj, self.proj]

        def __call__(self, x):
            return self.blocks[1](jnp.tanh(self.blocks[0](x)))

    init_fn, apply_fn = mx.transform(Twice())
    v = init_fn(0)
    assert jax.tree.map(jnp.shape, v) == {"params": {"proj": {"kernel": (4, 4), "bias": (4,)}}}
    x = jnp.linspace(-1, 1, 8).reshape(2, 4)

    def hand(p):
        with jax.numpy_rank_promotion("allow"):
            h = jnp.tanh(x @ p["kernel"] + p["bias"])
            return jnp.sum((h @ p["kernel"] + p["bias"]) ** 2)

    ours = jax.jit(jax.grad(lambda p: jnp.sum(apply_fn({"params": p}, None, x)[0] ** 2)))(
        v["params"]
    )
    assert_trees_close(ours["proj"], jax.jit(jax.grad(hand))(v["params"]["proj"]), n=N)


def test_tied_parameter_is_stored_at_its_first_path_in_attribute_order():
    class Sub(mx.Module):
        def __init__(self, w):
            self.w = w

    class Tied(mx.Module):
        def __init__(self):
            self.encoder = Sub(mx.Parameter(mx.initializers.normal(), (3, 3)))
            self.decoder_w = self.encoder.w
            self.extra = {"again": [self.encoder.w]}

        def __call__(self, x):
            return jnp.tanh(x @ self.encoder.w) @ self.decoder_w.T + x @ self.extra["again"][0]

    init_fn, apply_fn = mx.transform(Tied())
    v = init_fn(0)
    assert jax.tree.map(jnp.shape, v) == {"params": {"encoder": {"w": (3, 3)}}}

    def hand(w):
        return jnp.sum(jnp.tanh(X @ w) @ w.T + X @ w)

    ours = jax.jit(jax.grad(lambda v: jnp.sum(apply_fn(v, None, X)[0])))(v)
    theirs = jax.jit(jax.grad(hand))(v["params"]["encoder"]["w"])
    assert_close(ours["params"]["encoder"]["w"], theirs, n=N)


def test_tied_state_is_one_variable_updated_by_both_holders():
    class Counter(mx.Module):
        def __init__(self, count):
            self.count = count

        def __call__(self):
            self.count = self.count + 1

    class Two(mx.Module):
        def __init__(self):
            shared = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
            self.a = Counter(shared)
            self.b = Counter(shared)

        def __call__(self):
            self.a()
            self.b()

    init_fn, apply_fn = mx.transform(Two())
    v = init_fn(0)
    assert jax.tree.map(jnp.shape, v) == {"counters": {"a": {"count": ()}}}
    _, new = apply_fn(v, None)
    assert int(new["counters"]["a"]["count"]) == 2
