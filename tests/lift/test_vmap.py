"""mx.vmap against the unrolled or hand-written computation: init, values, gradients, State, rngs,
sown values, nesting, errors, and the leak check of a raw jax.vmap in module code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py
from trees import assert_trees_equal  # tests/lift/trees.py

import metoryx as mx
from metoryx import errors
from metoryx._core.rng import fold_in_path

D = 3  # features
# A vmapped and an unrolled or hand-written program sum and fuse in their own orders: their
# values are compared within tests/_tolerance.py's bound for R roundings (a 3-term dot, 2-sample
# statistics, tanh, the loss's sum, and as many back for gradients). Inits are compared exactly
# where both sides draw the same groups, i.e. run the same program.
R = 40
N = 3  # members
X = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)  # a batch of 2, the same for every member
XM = jnp.sin(jnp.arange(N * 2 * D, dtype=jnp.float32)).reshape(N, 2, D)  # one batch per member


class Member(mx.Module):
    """Parameters, batch statistics and a sown value: what one member of an ensemble holds."""

    def __init__(self):
        self.fc = mx.Dense(D, D)
        self.norm = mx.BatchNorm(D)

    def __call__(self, x, is_training=False):
        h = mx.sow("hidden", self.fc(x))
        return jnp.tanh(self.norm(h, is_training=is_training))


class Ensemble(mx.Module):
    def __init__(self, in_axes=None):
        self.members = mx.vmap(
            Member(),
            in_axes=in_axes,
            variable_axes={"params": 0, "batch_stats": 0},
            axis_size=N,
        )

    def __call__(self, x, is_training=False):
        return self.members(x, is_training=is_training)


class Unrolled(mx.Module):
    """The same ensemble written with a list: the reference of every ensemble test."""

    def __init__(self, in_axes=None):
        self.members = [Member() for _ in range(N)]
        self.in_axes = in_axes

    def __call__(self, x, is_training=False):
        inputs = [x if self.in_axes is None else x[i] for i in range(N)]
        return jnp.stack(
            [m(xi, is_training=is_training) for m, xi in zip(self.members, inputs, strict=True)]
        )


def test_ensemble_init_stacks_each_member_as_the_unrolled_list_bit_for_bit():
    model = Ensemble()
    variables = mx.init(model)(jax.random.key(0))
    assert variables["params"]["members"]["fc"]["kernel"].shape == (N, D, D)
    assert variables["batch_stats"]["members"]["norm"]["mean"].shape == (N, D)
    unrolled = mx.init(Unrolled())(jax.random.key(0))
    assert_trees_equal(mx.unstack(model, variables), unrolled)
    assert_trees_equal(mx.stack(model, unrolled), variables)
    kernels = variables["params"]["members"]["fc"]["kernel"]
    assert not np.array_equal(kernels[0], kernels[1])  # each member has its own start


@pytest.mark.parametrize("in_axes", [None, 0], ids=["same_input", "input_per_member"])
def test_ensemble_equals_the_unrolled_list_values_gradients_and_state(in_axes):
    ensemble, unrolled = Ensemble(in_axes), Unrolled(in_axes)
    x = X if in_axes is None else XM
    variables = mx.init(ensemble)(jax.random.key(0))
    flat = mx.unstack(ensemble, variables)

    def loss(params, apply_fn, variables):
        out, new = apply_fn({**variables, "params": params}, None, x, is_training=True)
        return jnp.sum(jnp.sin(out) * jnp.arange(D, dtype=jnp.float32)[None, None]), (out, new)

    step = jax.value_and_grad(loss, has_aux=True)
    (le, (ye, new_e)), ge = jax.jit(step, static_argnums=1)(
        variables["params"], mx.apply(ensemble), variables
    )
    (lu, (yu, new_u)), gu = jax.jit(step, static_argnums=1)(
        flat["params"], mx.apply(unrolled), flat
    )
    assert ye.shape == (N, 2, D)
    assert_close(ye, yu, n=R)
    terms = np.abs(np.sin(np.asarray(yu))) * np.arange(D)  # the loss is their signed sum
    assert_close(le, lu, n=R, scale=terms.sum())
    assert_trees_equal(mx.unstack(ensemble, {"params": ge})["params"], gu, exact=False, n=R)
    # Each member's statistics were updated with that member's own batch.
    assert_trees_equal(
        mx.unstack(ensemble, new_e)["batch_stats"], new_u["batch_stats"], exact=False, n=R
    )
    means = new_e["batch_stats"]["members"]["norm"]["mean"]
    assert not np.allclose(means[0], means[1])


class Shifted(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(D, D)

    def __call__(self, x, shift, scale=None):
        return jnp.tanh(self.fc(x)) * scale + shift


def hand_shifted(p, x, shift, scale):
    return jnp.tanh(jnp.dot(x, p["kernel"]) + p["bias"][None]) * scale + shift


@pytest.mark.parametrize(
    "in_axes, out_axes",
    [(0, 0), ([None, 0], 1)],
    ids=["all_mapped", "x_shared_as_a_list_out_axis_1"],
)
def test_shared_variables_give_jax_vmap_of_the_hand_written_layer(in_axes, out_axes):
    class Net(mx.Module):
        def __init__(self):
            self.layer = mx.vmap(Shifted(), in_axes=in_axes, out_axes=out_axes)

        def __call__(self, x, shift, scale):
            return self.layer(x, shift, scale=scale)  # a keyword: passed to all, unmapped

    axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    mapped = axes if isinstance(axes, tuple) else (axes, axes)
    x = XM if mapped[0] == 0 else X
    shift = XM[:, :1] if mapped[1] == 0 else XM[0, :1]
    scale = jnp.array([[0.5, 1.0, 2.0]])
    model = Net()
    variables = mx.init(model)(jax.random.key(0))
    assert variables["params"]["layer"]["fc"]["kernel"].shape == (D, D)  # shared: one copy
    variables["params"]["layer"]["fc"]["bias"] = jnp.array([0.1, -0.2, 0.3])

    def loss(params):
        out, _ = mx.apply(model)({"params": params}, None, x, shift, scale)
        return jnp.sum(jnp.sin(out)), out

    def hand_loss(p):  # a loop over the members, stacked on out_axes
        def member(a, i):
            return a if a.ndim == 2 else a[i]

        outs = [hand_shifted(p, member(x, i), member(shift, i), scale) for i in range(N)]
        out = jnp.stack(outs, axis=out_axes)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    (_, ref), ref_grads = jax.value_and_grad(hand_loss, has_aux=True)(
        variables["params"]["layer"]["fc"]
    )
    assert out.shape == ref.shape == ((N, 2, D) if out_axes == 0 else (2, N, D))
    assert_close(out, ref, n=R)
    # The shared parameters' gradient sums every member's.
    assert_trees_equal(grads["layer"]["fc"], ref_grads, exact=False, n=R)


class Noise(mx.Module):
    """Draws from two streams: "noise" and "other"."""

    def __call__(self, x):
        a = x + jax.random.normal(mx.next_rng_key("noise"), x.shape)
        return a, jax.random.normal(mx.next_rng_key("other"), x.shape)


SPLITS = [True, False, ("noise",)]


def test_member_keys_follow_the_documented_rule_and_the_caller_moves_past_them():
    class Net(mx.Module):
        def __init__(self):
            self.members = [
                mx.vmap(Noise(), in_axes=None, axis_size=N, split_rngs=split) for split in SPLITS
            ]
            self.after = Noise()

        def __call__(self, x):
            return [m(x) for m in self.members], self.after(x)

    root = jax.random.key(7)
    zeros = jnp.zeros(2)
    (draws, after), _ = jax.jit(mx.apply(Net()))({}, root, zeros)

    def expected(root):
        """Wrapper j draws what the caller's j-th key gives: the key itself for a stream it
        does not split (every member the same, as unlifted), else member i draws
        fold_in(fold_in(k, i), 0) with k that key. The layer after draws key 3."""
        base = {s: fold_in_path(root, ("stream", s)) for s in ("noise", "other")}
        out = []
        for j, split in enumerate(SPLITS):
            pair = []
            for stream in ("noise", "other"):
                k = jax.random.fold_in(base[stream], j)
                if split is True or (split is not False and stream in split):
                    keys = [jax.random.fold_in(jax.random.fold_in(k, i), 0) for i in range(N)]
                else:
                    keys = [k] * N
                pair.append(jnp.stack([jax.random.normal(key, (2,)) for key in keys]))
            out.append(tuple(pair))
        last = [jax.random.normal(jax.random.fold_in(base[s], 3), (2,)) for s in base]
        return out, tuple(last)

    ref_draws, ref_after = expected(root)
    for (noise, other), (ref_noise, ref_other) in zip(draws, ref_draws, strict=True):
        assert noise.shape == other.shape == (N, 2)
        # The same keys; the normal sampler may round its last bits apart in the jitted,
        # vmapped program.
        assert_close(noise, ref_noise)
        assert_close(other, ref_other)
    split_noise = draws[0][0]
    assert not np.allclose(split_noise[0], split_noise[1])  # split: members differ
    np.testing.assert_array_equal(draws[1][1][0], draws[1][1][1])  # unsplit: all the same
    assert_close(after, ref_after)


class Counter(mx.Module):
    def __init__(self):
        self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.fc = mx.Dense(D, D)

    def __call__(self, x):
        self.calls = self.calls + 1
        return self.fc(x)


@pytest.mark.parametrize("stacked", [False, True], ids=["shared", "stacked"])
def test_state_assigned_the_same_by_every_member_is_updated_once_or_per_member(stacked):
    axes = {"counters": 0} if stacked else None

    class Net(mx.Module):
        def __init__(self):
            self.counter = mx.vmap(Counter(), variable_axes=axes, axis_size=N)

        def __call__(self, x):
            return self.counter(x)

    init_fn, apply_fn = mx.transform(Net())
    variables = init_fn(jax.random.key(0))
    y, new = jax.jit(apply_fn)(variables, None, XM)
    expected = jnp.dot(XM, variables["params"]["counter"]["fc"]["kernel"])
    assert_close(y, expected, n=D)  # the bias starts at 0
    np.testing.assert_array_equal(new["counters"]["counter"]["calls"], [1] * N if stacked else 1)
    _, again = apply_fn(new, None, XM)
    np.testing.assert_array_equal(again["counters"]["counter"]["calls"], [2] * N if stacked else 2)


def test_shared_batch_norm_with_an_axis_name_equals_batch_norm_over_all_members():
    class Net(mx.Module):
        def __init__(self):
            self.norm = mx.vmap(mx.BatchNorm(D, axis_name="members"), axis_name="members")

        def __call__(self, x):
            return self.norm(x, is_training=True)

    model = Net()
    variables = mx.init(model)(jax.random.key(0))
    variables["params"]["norm"]["scale"] = jnp.array([0.5, 1.0, 2.0])
    weights = jnp.cos(jnp.arange(N * 2 * D, dtype=jnp.float32)).reshape(N, 2, D)

    def loss(params):
        out, new = mx.apply(model)({**variables, "params": params}, None, XM)
        return jnp.sum(out * weights), (out, new)

    def reference(params):
        flat = {"params": params["norm"], "batch_stats": variables["batch_stats"]["norm"]}
        out, new = mx.apply(mx.BatchNorm(D))(flat, None, XM.reshape(N * 2, D), is_training=True)
        return jnp.sum(out.reshape(N, 2, D) * weights), (out.reshape(N, 2, D), new)

    (_, (out, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    (_, (ref, ref_new)), ref_grads = jax.value_and_grad(reference, has_aux=True)(
        variables["params"]
    )
    assert_close(out, ref, n=R)
    assert_trees_equal(new["batch_stats"]["norm"], ref_new["batch_stats"], exact=False, n=R)
    assert_trees_equal(grads, ref_grads, exact=False, n=R)


def test_shared_state_assigned_differently_per_member_names_the_wrapper_and_the_fix():
    class Net(mx.Module):
        def __init__(self):
            self.norm = mx.vmap(mx.BatchNorm(D))

        def __call__(self, x):
            return self.norm(x, is_training=True)

    model = Net()
    with pytest.raises(
        errors.TransformBoundaryError,
        match=r"Vmap at 'norm'.*batch_stats/norm/mean.*variable_axes.*axis_name",
    ):
        mx.apply(model)(mx.init(model)(0), None, XM)


def test_sow_inside_records_one_value_per_member_stacked():
    ensemble, unrolled = Ensemble(), Unrolled()
    variables = mx.init(ensemble)(jax.random.key(0))
    out, _, found = jax.jit(mx.capture(mx.apply(ensemble)))(variables, None, X)
    assert list(found) == ["members/hidden"]
    (hidden,) = found["members/hidden"]  # one call, its members stacked
    assert hidden.shape == (N, 2, D)
    ref_out, _, ref = mx.capture(mx.apply(unrolled))(mx.unstack(ensemble, variables), None, X)
    expected = jnp.stack([ref[f"members/{i}/hidden"][0] for i in range(N)])
    assert_close(hidden, expected, n=R)
    assert_close(out, ref_out, n=R)


def test_an_ensemble_inside_repeat_equals_nested_lists():
    class Block(mx.Module):
        def __init__(self):
            self.heads = mx.vmap(
                mx.Dense(D, D), in_axes=None, variable_axes={"params": 0}, axis_size=2
            )

        def __call__(self, x):
            return jnp.tanh(jnp.mean(self.heads(x), axis=0))

    class ListBlock(mx.Module):
        def __init__(self):
            self.heads = [mx.Dense(D, D) for _ in range(2)]

        def __call__(self, x):
            return jnp.tanh(jnp.mean(jnp.stack([h(x) for h in self.heads]), axis=0))

    class Lists(mx.Module):
        def __init__(self):
            self.blocks = [ListBlock() for _ in range(3)]

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    class Stacked(mx.Module):
        def __init__(self):
            self.blocks = mx.Repeat(Block, 3)

        def __call__(self, x):
            return self.blocks(x)

    model = Stacked()
    variables = mx.init(model)(jax.random.key(0))
    assert variables["params"]["blocks"]["heads"]["kernel"].shape == (3, 2, D, D)
    unrolled = mx.init(Lists())(jax.random.key(0))
    assert_trees_equal(mx.unstack(model, variables), unrolled)
    y, _ = jax.jit(mx.apply(model))(variables, None, X)
    expected, _ = mx.apply(Lists())(unrolled, None, X)
    assert_close(y, expected, n=R)


def test_stacked_variables_round_trip_through_assign_variables_and_print_counts_copies():
    model = Ensemble()
    variables = mx.init(model)(jax.random.key(0))
    trained = jax.tree.map(lambda a: a + 1, variables)
    assert_trees_equal(mx.init(mx.assign_variables(model, trained))(jax.random.key(9)), trained)
    text = repr(mx.vmap(mx.Dense(D, D), variable_axes={"params": 0}, axis_size=4))
    assert "axis_size=4" in text and "Dense(" in text
    assert text.splitlines()[-1] == "Total: 48 parameters (192 B)"  # 4 copies of 12


def test_an_unrolled_checkpoint_given_to_an_ensemble_points_to_mx_stack():
    model = mx.vmap(mx.Dense(D, D), in_axes=None, variable_axes={"params": 0}, axis_size=N)
    one_member = mx.init(mx.Dense(D, D))(jax.random.key(0))
    with pytest.raises(
        errors.VariableShapeError, match=r"params/bias.*expected shape \(3, 3\).*mx.stack"
    ):
        mx.apply(model)(one_member, None, X)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mx.vmap(lambda x: x), "expected an mx.Module, got function"),
        (lambda: mx.vmap(Counter(), axis_size=0), "axis_size must be a positive int"),
        (lambda: mx.vmap(Counter(), variable_axes={"params": 0}), "axis_size=..."),
        (
            lambda: mx.vmap(Counter(), variable_axes={"params": 1}, axis_size=2),
            r"0 \(stacked\) or None",
        ),
        (lambda: mx.vmap(Counter(), variable_axes=["params"], axis_size=2), "variable_axes"),
        (lambda: mx.vmap(Counter(), split_rngs=3), "split_rngs must be True"),
        (lambda: mx.vmap(Counter(), in_axes="batch"), "`in_axes` must be an int.*'batch'"),
        (lambda: mx.vmap(Counter(), in_axes=(0, 1.5)), r"`in_axes`.*\(0, 1.5\)"),
        (lambda: mx.vmap(Counter(), in_axes={"x": 0}), r"`in_axes`.*\{'x': 0\}"),
        (lambda: mx.vmap(Counter(), in_axes=True), "`in_axes`.*True"),
        (lambda: mx.vmap(Counter(), out_axes=[0, "x"]), r"`out_axes`.*\(0, 'x'\)"),
        (lambda: mx.vmap(Counter(), axis_size="3"), "axis_size must be a positive int.*'3'"),
        (lambda: mx.vmap(Counter(), axis_size=2.0), "axis_size must be a positive int.*2.0"),
        (lambda: mx.vmap(Counter(), axis_name=0), "axis_name must be None or a str"),
        # Like mx.Repeat's n: init_fn would list 2**70 copy paths, a MemoryError.
        (lambda: mx.vmap(Counter(), axis_size=2**70), "below 2\\*\\*63.*1180591620717411303424"),
    ],
    ids=[
        "not_a_module",
        "axis_size",
        "no_axis_size",
        "axis_1",
        "not_a_dict",
        "split_rngs",
        "in_axes_str",
        "in_axes_float_entry",
        "in_axes_dict",
        "in_axes_bool",
        "out_axes_str_entry",
        "axis_size_str",
        "axis_size_float",
        "axis_name_int",
        "axis_size_huge",
    ],
)
def test_configuration_errors_name_the_wrapper_and_the_fix(make, match):
    with pytest.raises(errors.LayerConfigError, match=r"mx.vmap\((Counter|function)\).*" + match):
        make()


def test_valid_axes_specs_are_kept_as_jax_vmap_takes_them():
    assert mx.vmap(Counter(), in_axes=[0, None]).in_axes == (0, None)
    assert mx.vmap(Counter(), in_axes=(0, {"a": None, "b": 1})).in_axes == (0, {"a": None, "b": 1})
    assert mx.vmap(Counter(), out_axes={"y": 0}).out_axes == {"y": 0}
    assert mx.vmap(Counter(), in_axes=np.int64(1), axis_size=np.int32(2)).axis_size == 2


class Pair(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(D, D)

    def __call__(self, a, b):
        return self.fc(a) + b


def _pair_model(**options):
    class Net(mx.Module):
        def __init__(self):
            self.pair = mx.vmap(Pair(), **options)

        def __call__(self, a, b):
            return self.pair(a, b)

    return Net()


@pytest.mark.parametrize(
    "options, args, match",
    [
        ({}, (XM, XM[:2]), r"Vmap at 'pair'.*sizes \[2, 3\]"),
        ({"in_axes": None}, (X, X), r"Vmap at 'pair'.*nothing is mapped.*axis_size"),
        # An ensemble of N members given inputs for 2: named like the other size errors.
        (
            {"variable_axes": {"params": 0}, "axis_size": N},
            (XM[:2], XM[:2]),
            r"Vmap at 'pair'",
        ),
        # An in_axes tuple longer than the arguments: named, not a raw pytree error.
        ({"in_axes": (0, 0, 0)}, (XM, XM), r"Vmap at 'pair'.*in_axes"),
    ],
    ids=["sizes_differ", "nothing_mapped", "axis_size_differs", "in_axes_too_long"],
)
def test_input_errors_name_the_wrapper_and_the_fix(options, args, match):
    model = _pair_model(**options)
    variables = mx.init(model)(0)
    with pytest.raises(errors.InputShapeError, match=match):
        mx.apply(model)(variables, None, *args)


def test_calling_outside_apply_fn_says_how_to_run_it():
    with pytest.raises(errors.ApplyContextError, match=r"mx.vmap .*outside apply_fn.*transform"):
        mx.vmap(Pair())(X, X)


def test_state_of_a_module_outside_the_vmap_cannot_be_assigned_inside():
    class Uses(mx.Module):
        def __init__(self, counter):
            self.counter = counter

        def __call__(self, x):
            return self.counter(x)

    class Net(mx.Module):
        def __init__(self):
            self.counter = Counter()  # first path: outside the vmap
            self.mapped = mx.vmap(Uses(self.counter))

        def __call__(self, x):
            return self.mapped(x)

    model = Net()
    with pytest.raises(
        errors.TransformBoundaryError,
        match=r"Counter at 'counter'.calls \(counters/counter/calls\).*inside mx.vmap.*outside",
    ):
        mx.apply(model)(mx.init(model)(0), None, XM)


def test_a_module_cannot_be_both_an_ensemble_member_and_used_outside():
    shared = mx.Dense(D, D)

    class Net(mx.Module):
        def __init__(self):
            self.members = mx.vmap(shared, variable_axes={"params": 0}, axis_size=N)
            self.head = shared

    with pytest.raises(errors.ModuleStructureError, match="head.*other side of a lifted wrapper"):
        mx.transform(Net())


class RawVmapState(mx.Module):
    def __init__(self):
        self.counter = Counter()

    def __call__(self, xs):
        return jax.vmap(self.counter)(xs)


class RawVmapKey(mx.Module):
    def __call__(self, xs):
        return jax.vmap(lambda x: x + jax.random.normal(mx.next_rng_key("noise"), x.shape))(xs)


@pytest.mark.parametrize(
    "model, where",
    [
        (RawVmapState(), r"Counter at 'counter'.calls \(counters/counter/calls\) is assigned"),
        # The key is drawn by the root module: the message names it like every other error.
        (RawVmapKey(), r"mx.next_rng_key\('noise'\).*RawVmapKey"),
    ],
    ids=["state", "key"],
)
def test_raw_jax_vmap_in_module_code_cannot_assign_state_or_draw_keys(model, where):
    init_fn, apply_fn = mx.transform(model)
    with pytest.raises(
        errors.TransformBoundaryError, match=where + r".*jax.vmap.*Use the lifted version.*mx.vmap"
    ):
        jax.jit(apply_fn)(init_fn(0), jax.random.key(0), XM)
