"""mx.cond and mx.switch against calling the taken branch directly: values, gradients, State,
random keys and sown values; outside apply_fn as lax.cond/lax.switch; the leak check of a raw
lax.cond in module code."""

import _tolerance  # tests/_tolerance.py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close
from jax import lax

import metoryx as mx
from metoryx import errors
from metoryx._core.rng import fold_in_path

D = 3
X = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)


# A lifted branch is compiled inside lax.cond, its reference alone: XLA may sum and fuse them in
# other orders, so values are compared within tests/_tolerance.py's bound for R roundings (a
# 3-term dot, tanh or a 3-sample mean, the loss's sum, and as many back for gradients).
R = 30


def assert_trees_close(a, b):
    _tolerance.assert_trees_close(a, b, n=R)


class Counted(mx.Module):
    """One branch: parameters, a call counter and a dropout key."""

    def __init__(self):
        self.fc = mx.Dense(D, D)
        self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

    def __call__(self, x):
        self.calls = self.calls + 1
        return mx.dropout(jnp.tanh(self.fc(x)), 0.5, is_training=True)


class Noisy(mx.Module):
    """The other: parameters, a running mean and a key of another stream."""

    def __init__(self):
        self.fc = mx.Dense(D, D)
        self.mean = mx.State("batch_stats", mx.initializers.zeros, (D,))

    def __call__(self, x):
        y = self.fc(x)
        self.mean = 0.5 * self.mean + 0.5 * jnp.mean(y, axis=0)
        return y + jax.random.normal(mx.next_rng_key("noise"), y.shape)


class Gate(mx.Module):
    def __init__(self):
        self.a = Counted()
        self.b = Noisy()

    def __call__(self, pred, x):
        return mx.cond(pred, self.a, self.b, x)


RNGS = mx.PRNGKeys(jax.random.key(3), dropout=jax.random.key(4))


def _loss(params, apply_fn, variables, *args):
    out, new = apply_fn({**variables, "params": params}, RNGS, *args)
    return jnp.sum(jnp.sin(out)), (out, new)


def test_cond_equals_calling_the_taken_branch_values_gradients_state_and_keys():
    model = Gate()
    variables = mx.init(model)(jax.random.key(0))
    variables["batch_stats"]["b"]["mean"] = jnp.ones(D)  # a value the untaken branch keeps
    step = jax.value_and_grad(_loss, has_aux=True)
    lifted = jax.jit(step, static_argnums=1)
    apply_fn = mx.apply(model)

    @jax.jit
    def direct(params):  # the reference: each branch called directly, unlifted
        found = {}
        for name in ["a", "b"]:
            branch = mx.transform(model, method=lambda m, x, name=name: getattr(m, name)(x))
            found[name] = step(params, branch.apply, variables, X)
        return found

    references = direct(variables["params"])
    for pred, taken, untaken in [(True, "a", "b"), (False, "b", "a")]:
        # pred is traced: one program holds both branches, compiled once.
        (_, (out, new)), grads = lifted(
            variables["params"], apply_fn, variables, jnp.asarray(pred), X
        )
        (_, (ref, ref_new)), ref_grads = references[taken]
        assert_close(out, ref, n=R)  # the same dropout/noise
        assert_trees_close(new, ref_new)  # the taken branch's State updated, the other's kept
        assert_trees_close(grads, ref_grads)  # zero for the untaken branch's parameters
        assert not any(np.any(g) for g in jax.tree.leaves(grads[untaken]))
        assert int(new["counters"]["a"]["calls"]) == int(pred)


class Experts(mx.Module):
    def __init__(self):
        self.experts = [mx.Dense(D, D) for _ in range(3)]

    def __call__(self, index, x):
        return mx.switch(index, self.experts, x)


def test_switch_runs_the_indexed_expert_and_clamps_the_index_like_lax_switch():
    model = Experts()
    variables = mx.init(model)(jax.random.key(0))
    apply_fn = jax.jit(mx.apply(model))
    for index, expert in [(-1, 0), (1, 1), (2, 2), (5, 2)]:
        y, _ = apply_fn(variables, None, index, X)
        p = variables["params"]["experts"][str(expert)]
        expected = jnp.dot(X, p["kernel"]) + p["bias"][None]
        assert_close(y, expected, n=D + 1)


class Scale(mx.Module):
    """Functions as branches, several operands, and State assigned in one branch only: the
    model's own counter, and the sub-module's running mean."""

    def __init__(self):
        self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.noisy = Noisy()

    def scaled(self, x, s):
        self.calls = self.calls + 1
        return self.noisy(x) * s

    def __call__(self, pred, x, s):
        return mx.cond(pred, self.scaled, lambda x, s: x * s, x, s)


def test_state_assigned_in_one_branch_is_returned_and_kept_when_the_other_runs():
    model = Scale()
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    s = jnp.float32(2.0)
    step = jax.jit(apply_fn)
    y, new = step(variables, jax.random.key(1), True, X, s)
    ref, ref_new = mx.transform(model, method=lambda m, x, s: m.scaled(x, s)).apply(
        variables, jax.random.key(1), X, s
    )
    assert_close(y, ref, n=R)
    assert_trees_close(new, ref_new)
    assert int(new["counters"]["calls"]) == 1
    y, kept = step(new, jax.random.key(1), False, X, s)
    np.testing.assert_array_equal(y, X * s)  # one multiply: rounded once in any program
    assert_trees_close(kept, new)  # the identity branch changed nothing


class Draws(mx.Module):
    """Branches that draw one and two keys of the same stream; then one more after."""

    def one(self, x):
        return x + jax.random.normal(mx.next_rng_key("noise"), x.shape)

    def two(self, x):
        return self.one(self.one(x))

    def __call__(self, index, x):
        y = mx.switch(index, [self.one, self.two], x)
        return y, jax.random.normal(mx.next_rng_key("noise"), x.shape)


def test_switch_draws_the_unlifted_keys_and_later_draws_move_past_every_branch():
    model = Draws()
    root = jax.random.key(5)
    base = fold_in_path(root, ("stream", "noise"))
    apply_fn = jax.jit(mx.apply(model))
    for index, name in [(0, "one"), (1, "two")]:
        (y, after), _ = apply_fn({}, root, index, X)
        ref, _ = mx.apply(model, method=lambda m, x, name=name: getattr(m, name)(x))({}, root, X)
        # The taken branch's keys: as unlifted. The normal sampler, compiled in the switch, may
        # round its last bits apart from the eager one's; two draws are added.
        assert_close(y, ref, n=2)
        # The counter is static: after the switch it is past the longest branch's keys (2),
        # whichever ran, so no key drawn inside is ever drawn again.
        expected = jax.random.normal(jax.random.fold_in(base, 2), X.shape)
        assert_close(after, expected)


class Sows(mx.Module):
    def __init__(self, other="h", other_shape=False):
        self.fc = mx.Dense(D, D)
        self.other = other
        self.other_shape = other_shape

    def __call__(self, pred, x):
        def a(x):
            return mx.sow("h", self.fc(x))

        def b(x):
            y = -x
            mx.sow(self.other, y[0] if self.other_shape else y)
            return y

        return mx.cond(pred, a, b, x)


def test_a_value_sown_in_every_branch_is_the_taken_branchs():
    model = Sows()
    variables = mx.init(model)(jax.random.key(0))
    captured = jax.jit(mx.capture(mx.apply(model)))
    p = variables["params"]["fc"]
    for pred, expected in [(True, jnp.dot(X, p["kernel"]) + p["bias"][None]), (False, -X)]:
        y, _, found = captured(variables, None, pred, X)
        assert list(found) == ["h"]
        (h,) = found["h"]
        assert_close(h, expected, n=D + 1)
        assert_close(y, expected, n=D + 1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"other": "g"}, r"branch 0: \['g'\]; branch 1: \['h'\]"),
        ({"other_shape": True}, "sow"),  # the same name with another shape
    ],
    ids=["names", "shapes"],
)
def test_branches_that_sow_different_values_raise_while_capturing_only(options, match):
    model = Sows(**options)
    variables = mx.init(model)(jax.random.key(0))
    y, _ = mx.apply(model)(variables, None, False, X)  # not capturing: sow does nothing
    np.testing.assert_allclose(y, -X)
    with pytest.raises(errors.TransformBoundaryError, match="mx.switch/mx.cond.*" + match):
        mx.capture(mx.apply(model))(variables, None, True, X)


def test_outside_apply_fn_cond_and_switch_are_lax_cond_and_lax_switch():
    def ours(a):
        return mx.cond(a > 0, jnp.sin, jnp.cos, a) + mx.switch(2, [jnp.sin, jnp.cos, jnp.tanh], a)

    def theirs(a):
        return lax.cond(a > 0, jnp.sin, jnp.cos, a) + lax.switch(2, [jnp.sin, jnp.cos, jnp.tanh], a)

    step = jax.jit(jax.value_and_grad(ours))
    for a in [jnp.float32(0.5), jnp.float32(-0.5)]:
        value, grad = step(a)
        ref_value, ref_grad = jax.value_and_grad(theirs)(a)
        # sin, cos and tanh, jitted here and eager there: XLA's vectorised polynomials and
        # the scalar ones may round their last bits apart.
        assert_close(value, ref_value, n=2)
        assert_close(grad, ref_grad, n=2)


def test_cond_inside_an_ensemble_takes_each_members_branch_and_keeps_its_state():
    class Member(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(D, D)
            self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

        def bump(self, x):
            self.calls = self.calls + 1
            return self.fc(x)

        def __call__(self, pred, x):
            return mx.cond(pred, self.bump, jnp.negative, x)

    class Net(mx.Module):
        def __init__(self):
            self.members = mx.vmap(
                Member(),
                in_axes=(0, None),
                variable_axes={"params": 0, "counters": 0},
                axis_size=3,
            )

        def __call__(self, preds, x):
            return self.members(preds, x)

    model = Net()
    variables = mx.init(model)(jax.random.key(0))
    preds = jnp.array([True, False, True])
    y, new = jax.jit(mx.apply(model))(variables, None, preds, X)
    np.testing.assert_array_equal(new["counters"]["members"]["calls"], [1, 0, 1])
    p = variables["params"]["members"]
    for i in range(3):
        expected = jnp.dot(X, p["fc"]["kernel"][i]) + p["fc"]["bias"][i][None] if preds[i] else -X
        assert_close(y[i], expected, n=D + 1)


def test_switch_without_branches_says_so():
    model = mx.Lambda(lambda x: mx.switch(0, [], x))
    with pytest.raises(errors.LayerConfigError, match="at least one branch"):
        mx.apply(model)({}, None, X)


# Found by tests/test_bad_arguments.py: these reached lax.switch (or Python) unchecked, and a
# float or negative pred picked a branch by truncation and clamping where lax.cond refuses or
# reads nonzero as true.
BAD_BRANCH_ARGUMENTS = {
    "index a str": (lambda: mx.switch("1", [jnp.sin], X), errors.InputDtypeError, "`index`"),
    "index a bool": (lambda: mx.switch(True, [jnp.sin], X), errors.InputDtypeError, "mx.cond"),
    "index a float": (lambda: mx.switch(1.0, [jnp.sin], X), errors.InputDtypeError, "astype"),
    "index with axes": (
        lambda: mx.switch(jnp.zeros(2, jnp.int32), [jnp.sin], X),
        errors.InputShapeError,
        "shape (2,)",
    ),
    "branches not a list": (lambda: mx.switch(0, jnp.sin, X), errors.LayerConfigError, "list"),
    "a branch not callable": (
        lambda: mx.switch(0, [jnp.sin, 2], X),
        errors.LayerConfigError,
        "{1: 'int 2'}",
    ),
    "branches of other shapes": (
        lambda: mx.switch(0, [jnp.sin, jnp.sum], X),
        errors.LayerConfigError,
        "branch 0 returns float32[2, 3]",
    ),
    "a branch returning no array": (
        lambda: mx.switch(0, [jnp.sin, str], X),
        errors.LayerConfigError,
        "branch 1 returned str",
    ),
    "pred a float": (lambda: mx.cond(0.5, jnp.sin, jnp.cos, X), errors.InputDtypeError, "x > 0"),
    "pred a str": (lambda: mx.cond("yes", jnp.sin, jnp.cos, X), errors.InputDtypeError, "`pred`"),
    "true_fn not callable": (
        lambda: mx.cond(True, None, jnp.cos, X),
        errors.LayerConfigError,
        "`true_fn` must be a function",
    ),
    "branches returning None and an array": (
        lambda: mx.cond(True, lambda x: None, jnp.cos, X),
        errors.LayerConfigError,
        "false_fn returns float32[2, 3]; true_fn returns None",
    ),
}


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside apply_fn"])
@pytest.mark.parametrize("case", BAD_BRANCH_ARGUMENTS)
def test_bad_branch_arguments_are_our_errors(case, inside):
    call, error, fragment = BAD_BRANCH_ARGUMENTS[case]
    with pytest.raises(error) as info:
        if inside:
            mx.apply(mx.Lambda(lambda _: call()))({}, None, X)
        else:
            call()
    assert str(info.value).startswith(("mx.switch", "mx.cond")) and fragment in str(info.value)


def test_an_int_pred_is_true_when_nonzero_and_a_huge_index_is_clamped():
    for pred in [-1, 2, np.int8(-3), jnp.int32(-1)]:
        # sin inside lax.cond's program and alone may vectorise differently: a few ulps apart;
        # the branch taken is what counts (cos is far from sin on X). |sin| <= 1: 8e-7 ~ 7 eps.
        np.testing.assert_allclose(mx.cond(pred, jnp.sin, jnp.cos, X), jnp.sin(X), atol=8e-7)
    np.testing.assert_allclose(mx.cond(0, jnp.sin, jnp.cos, X), jnp.cos(X), atol=8e-7)
    np.testing.assert_allclose(mx.switch(2**70, [jnp.sin, jnp.cos], X), jnp.cos(X), atol=8e-7)
    np.testing.assert_allclose(mx.switch(-(2**70), [jnp.sin, jnp.cos], X), jnp.sin(X), atol=8e-7)


class RawCondState(mx.Module):
    def __init__(self):
        self.counted = Counted()

    def __call__(self, pred, x):
        return lax.cond(pred, self.counted, jnp.negative, x)


class RawCondKey(mx.Module):
    def __call__(self, pred, x):
        def noisy(x):
            return x + jax.random.normal(mx.next_rng_key("noise"), x.shape)

        return lax.cond(pred, noisy, jnp.negative, x)


@pytest.mark.parametrize(
    "model, where",
    [
        (RawCondState(), r"Counted at 'counted'.calls \(counters/counted/calls\) is assigned"),
        # The key is drawn by the root module: the message names it like every other error.
        (RawCondKey(), r"mx.next_rng_key\('noise'\).*RawCondKey"),
    ],
    ids=["state", "key"],
)
def test_raw_lax_cond_in_module_code_cannot_assign_state_or_draw_keys(model, where):
    init_fn, apply_fn = mx.transform(model)
    with pytest.raises(
        errors.TransformBoundaryError,
        match=where + r".*jax.lax.cond.*Use the lifted version.*mx.cond or mx.switch",
    ):
        jax.jit(apply_fn)(init_fn(0), RNGS, True, X)
