"""mx.sow and mx.capture: recorded values against the hand-written computation, under jit and
grad; sub-module outputs without changing model code; patterns, errors, the raw-transformation
leak check, and stacking inside mx.Repeat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx import errors

D = 3
X = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
# Captured, jitted and hand-written programs sum and fuse in their own orders: compared within
# tests/_tolerance.py's bound for N roundings (3 layers of a 3-term dot, bias and tanh, and as
# many back for gradients).
N = 30


def record_double(h):
    """A plain function that sows: the value is the calling module's."""
    return mx.sow("double", 2 * h)


class Layer(mx.Module):
    def __init__(self):
        self.fc = mx.Dense(D, D)

    def __call__(self, x):
        h = mx.sow("pre", self.fc(x))
        record_double(h)
        return jnp.tanh(h)


class Net(mx.Module):
    """enc once, dec twice; a State and a value sown by the root."""

    def __init__(self):
        self.enc = Layer()
        self.dec = Layer()
        self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

    def __call__(self, x):
        self.calls = self.calls + 1
        mx.sow("input", x)
        return self.dec(self.dec(self.enc(x)))


def hand_net(p, x):
    """Net in plain JAX: the output and every intermediate, by capture key."""

    def dense(q, x):
        return jnp.dot(x, q["kernel"]) + q["bias"][None]

    found = {"input": [x]}
    h = x
    for name in ["enc", "dec", "dec"]:
        pre = dense(p[name]["fc"], h)
        found.setdefault(f"{name}/pre", []).append(pre)
        found.setdefault(f"{name}/double", []).append(2 * pre)
        found.setdefault(f"{name}/fc", []).append(pre)
        h = jnp.tanh(pre)
        found.setdefault(name, []).append(h)
    return h, found


@pytest.fixture(scope="module")
def net():
    init_fn, apply_fn = mx.transform(Net())
    variables = init_fn(jax.random.key(0))
    variables["params"]["dec"]["fc"]["bias"] = jnp.array([0.1, -0.2, 0.3])
    return apply_fn, variables


def assert_found(found, expected, keys):
    assert sorted(found) == sorted(keys)
    for key in keys:
        assert isinstance(found[key], tuple)
        assert len(found[key]) == len(expected[key]), key  # one value per call, in call order
        for got, want in zip(found[key], expected[key], strict=True):
            assert_close(got, want, n=N)


ALL_SOWN = ["input", "enc/pre", "enc/double", "dec/pre", "dec/double"]


def test_capture_records_every_sown_value_per_call_and_leaves_the_call_unchanged(net):
    apply_fn, variables = net
    out, new, found = jax.jit(mx.capture(apply_fn))(variables, None, X)
    ref_out, expected = hand_net(variables["params"], X)
    assert_found(found, expected, ALL_SOWN)
    assert_close(out, ref_out, n=N)
    plain_out, plain_new = apply_fn(variables, None, X)
    assert_close(out, plain_out, n=N)
    assert jax.tree.structure(new) == jax.tree.structure(plain_new)
    assert int(new["counters"]["calls"]) == 1


@pytest.mark.parametrize(
    "sown, keys",
    [
        ("enc/*", ["enc/pre", "enc/double"]),
        (["*/pre", "input"], ["input", "enc/pre", "dec/pre"]),
        ("nothing/*", []),
        (None, []),
    ],
    ids=["glob", "list", "no_match", "none"],
)
def test_sown_patterns_select_keys_by_module_path_and_name(net, sown, keys):
    apply_fn, variables = net
    _, found = hand_net(variables["params"], X)
    _, _, captured = mx.capture(apply_fn, sown=sown)(variables, None, X)
    assert_found(captured, found, keys)


def test_without_capture_sow_adds_nothing_to_the_program():
    class Sowing(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(D, D)

        def __call__(self, x):
            h = mx.sow("pre", self.fc(x))
            return mx.sow("out", jnp.tanh(h))

    class Plain(mx.Module):  # the same without its sow calls
        def __init__(self):
            self.fc = mx.Dense(D, D)

        def __call__(self, x):
            return jnp.tanh(self.fc(x))

    def program(model):
        variables = mx.init(model)(jax.random.key(0))
        jaxpr = jax.make_jaxpr(lambda v: mx.apply(model)(v, None, X)[0])(variables)
        return [e.primitive.name for e in jaxpr.eqns]

    assert program(Sowing()) == program(Plain())


def test_outputs_records_sub_module_outputs_without_changing_the_model(net):
    apply_fn, variables = net
    _, expected = hand_net(variables["params"], X)
    capture = jax.jit(mx.capture(apply_fn, sown=None, outputs=["enc", "dec", "*/fc"]))
    out, _, found = capture(variables, None, X)
    assert_found(found, expected, ["enc", "dec", "enc/fc", "dec/fc"])  # dec: two calls
    # The plain apply_fn, and a capture of other paths, record nothing of these.
    plain, _ = apply_fn(variables, None, X)
    assert_close(out, plain, n=N)
    _, _, only_enc = mx.capture(apply_fn, sown=None, outputs="enc")(variables, None, X)
    assert_found(only_enc, expected, ["enc"])
    _, _, none = mx.capture(apply_fn, sown=None)(variables, None, X)
    assert none == {}


def test_outputs_leave_the_model_and_the_uncaptured_program_as_they_were():
    model = Net()
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    before = jax.make_jaxpr(lambda v: apply_fn(v, None, X))(variables)
    mx.capture(apply_fn, outputs=["enc", "dec/fc"])
    after = jax.make_jaxpr(lambda v: apply_fn(v, None, X))(variables)
    assert [e.primitive.name for e in after.eqns] == [e.primitive.name for e in before.eqns]
    assert type(model.enc) is Layer and type(model.dec.fc) is mx.Dense  # the user's objects


def test_grad_through_captured_values_equals_the_hand_written_gradient(net):
    apply_fn, variables = net
    captured = mx.capture(apply_fn, sown="*/pre")

    def loss(params):  # the output plus a penalty on the pre-activations
        out, _, found = captured({**variables, "params": params}, None, X)
        penalty = sum(jnp.sum(h**2) for values in found.values() for h in values)
        return jnp.sum(out) + 0.1 * penalty

    def hand_loss(params):
        out, found = hand_net(params, X)
        penalty = sum(jnp.sum(h**2) for k in ["enc/pre", "dec/pre"] for h in found[k])
        return jnp.sum(out) + 0.1 * penalty

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    ref_value, ref_grads = jax.value_and_grad(hand_loss)(variables["params"])
    assert_close(value, ref_value, n=N)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert_close(got, want, n=N)


class Stacked(mx.Module):
    def __init__(self):
        self.blocks = mx.Repeat(Layer, 3)

    def __call__(self, x):
        return self.blocks(x)


class Unrolled(mx.Module):
    def __init__(self):
        self.blocks = [Layer() for _ in range(3)]

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_values_sown_inside_repeat_are_stacked_one_per_copy():
    model = Stacked()
    variables = mx.init(model)(jax.random.key(0))
    out, _, found = jax.jit(mx.capture(mx.apply(model)))(variables, None, X)
    ref_out, _, ref = mx.capture(mx.apply(Unrolled()))(mx.unstack(model, variables), None, X)
    assert sorted(found) == ["blocks/double", "blocks/pre"]
    for name in ["pre", "double"]:
        (stacked,) = found[f"blocks/{name}"]  # one call of the Repeat, its copies stacked
        assert stacked.shape == (3, 2, D)
        expected = jnp.stack([ref[f"blocks/{i}/{name}"][0] for i in range(3)])
        assert_close(stacked, expected, n=N)
    assert_close(out, ref_out, n=N)


def test_outputs_inside_repeat_are_stacked_per_copy_and_the_wrapper_records_its_own():
    model = Stacked()
    variables = mx.init(model)(jax.random.key(0))
    capture = mx.capture(mx.apply(model), sown=None, outputs=["blocks", "blocks/fc"])
    out, _, found = jax.jit(capture)(variables, None, X)
    _, _, ref = mx.capture(mx.apply(Unrolled()), outputs="blocks/*/fc")(
        mx.unstack(model, variables), None, X
    )
    (per_copy,) = found["blocks/fc"]
    expected = jnp.stack([ref[f"blocks/{i}/fc"][0] for i in range(3)])
    assert_close(per_copy, expected, n=N)
    (whole,) = found["blocks"]
    np.testing.assert_array_equal(whole, out)  # the very value the model returns


def test_an_outputs_pattern_matching_no_module_lists_the_paths(net):
    apply_fn, _ = net
    with pytest.raises(
        errors.LayerConfigError,
        match=r"no module has a path matching \['encoder'\].*\['dec', 'dec/fc', 'enc', 'enc/fc'\]",
    ):
        mx.capture(apply_fn, outputs=["enc", "encoder"])


def test_the_root_is_not_a_sub_module_to_capture(net):
    # Its output is apply_fn's: a pattern naming only the root would capture nothing.
    apply_fn, _ = net
    with pytest.raises(errors.LayerConfigError, match=r"matching \[''\].*own output is what"):
        mx.capture(apply_fn, outputs="")


@pytest.mark.parametrize(
    "fn",
    [lambda a: jax.jit(a), lambda a: mx.init(Net()), lambda a: lambda *args: a(*args)],
    ids=["jitted", "init_fn", "wrapped"],
)
def test_capture_wants_the_apply_fn_itself_and_says_to_jit_after(net, fn):
    apply_fn, _ = net
    with pytest.raises(errors.LayerConfigError, match=r"apply_fn of mx.transform.*Capture first"):
        mx.capture(fn(apply_fn))


def test_a_sown_key_equal_to_a_captured_output_path_is_refused():
    class Net(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(D, D)

        def __call__(self, x):
            return mx.sow("fc", self.fc(x))  # the key "fc" is also the sub-module's path

    model = Net()
    variables = mx.init(model)(jax.random.key(0))
    with pytest.raises(errors.LayerConfigError, match=r"mx.sow\('fc'\).*'fc'.*Rename"):
        mx.capture(mx.apply(model), outputs="fc")(variables, None, X)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"sown": False}, "sown"),
        ({"sown": 3}, "sown"),
        ({"sown": ["a", 1]}, "sown"),
        ({"outputs": None}, "outputs"),
        ({"outputs": b"fc"}, "outputs"),
    ],
)
def test_capture_patterns_that_are_no_strs_are_refused(net, options, name):
    apply_fn, _ = net
    with pytest.raises(errors.LayerConfigError, match=f"mx.capture: `{name}` must be a pattern"):
        mx.capture(apply_fn, **options)


@pytest.mark.parametrize("name", ["a/b", "", 3, None])
def test_a_sow_name_that_is_no_plain_name_is_refused_captured_or_not(name):
    class Net(mx.Module):
        def __call__(self, x):
            return mx.sow(name, x)

    for fn in (mx.apply(Net()), mx.capture(mx.apply(Net()))):
        with pytest.raises(errors.LayerConfigError, match="non-empty str without '/'") as info:
            fn({}, None, X)
        assert repr(name) in str(info.value)


class RawVmapSow(mx.Module):
    def __call__(self, xs):
        return jax.vmap(lambda x: mx.sow("h", 2 * x))(xs)


class RawScanSow(mx.Module):
    def __call__(self, xs):
        return jax.lax.scan(lambda c, x: (c, mx.sow("h", 2 * x)), 0.0, xs)[1]


@pytest.mark.parametrize("model", [RawVmapSow(), RawScanSow()], ids=["vmap", "scan"])
def test_sow_inside_a_raw_transformation_raises_only_while_recording(model):
    apply_fn = mx.apply(model)
    y, _ = apply_fn({}, None, X)  # not capturing: a no-op
    np.testing.assert_allclose(y, 2 * X)
    y, _, found = mx.capture(apply_fn, sown="other")({}, None, X)  # not selected: a no-op
    assert found == {}
    with pytest.raises(
        errors.TransformBoundaryError, match=r"mx.sow\('h'\).*Use the lifted version.*mx.vmap"
    ):
        mx.capture(apply_fn)({}, None, X)
