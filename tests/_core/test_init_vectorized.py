"""Variables that share an initializer, shape and dtype are drawn together: the one-by-one draws.

Bit for bit for the uniform initializers on every CPU; the normal ones may differ in the last
float32 bits, which XLA:CPU may round differently in the grouped and the single kernel
(``Initializer``'s "Drawn together" in ``metoryx/initializers.py``).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx import errors, initializers
from metoryx._core.init import Group, InitPlan, _program
from metoryx._core.paths import flatten_variables
from metoryx._core.rng import fold_in_path
from metoryx._core.transform import Snapshot

RANDOM = {
    "normal": initializers.normal(0.02, mean=0.1),
    "truncated_normal": initializers.truncated_normal(0.5),
    "uniform": initializers.uniform(-0.2, 0.3),
    "glorot_uniform": initializers.glorot_uniform(),
    "glorot_normal": initializers.glorot_normal(),
    "lecun_uniform": initializers.lecun_uniform(),
    "lecun_normal": initializers.lecun_normal(),
    "he_uniform": initializers.he_uniform(),
    "he_normal": initializers.he_normal(),
    "variance_scaling": initializers.variance_scaling(0.5, "fan_avg", "truncated_normal"),
}
SHAPES = [(5, 7), (2, 3, 4, 6)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


class Bank(mx.Module):
    """Three alike variables per (initializer, shape, dtype), and one that stands alone."""

    def __init__(self, init, shape, dtype):
        super().__init__()
        self.alike = [mx.Parameter(init, shape, dtype) for _ in range(3)]
        self.alone = mx.Parameter(init, shape[::-1], dtype)


class Banks(mx.Module):
    """A ``Bank`` of each shape and dtype."""

    def __init__(self, init):
        super().__init__()
        self.banks = [Bank(init, shape, dtype) for shape in SHAPES for dtype in DTYPES]


def one_by_one(model, key):
    """What init_fn gave before grouping: each variable drawn with its own path's key."""
    snapshot = Snapshot(model, None)
    out = {}
    for bound in snapshot.variables:
        var = bound.variable
        out[bound.path] = var.init(fold_in_path(key, bound.path), var.shape, var.dtype)
    return out


# Their map from the random bits has no multiply feeding an add (initializers._uniform): no
# fused multiply-add for XLA to make in one kernel and not in the other, so the bits are equal.
EXACT = {"uniform", "glorot_uniform", "lecun_uniform", "he_uniform"}


def assert_same_draws(variables, expected, exact):
    """The same paths, dtypes and values: the same bits (``exact``), or else within a few ulps
    of the array's largest value in its dtype (a normal sampler's polynomial, whose
    multiply-adds XLA may fuse differently in the grouped and the single kernel)."""
    flat = flatten_variables(variables)
    assert flat.keys() == expected.keys()
    for path, value in expected.items():
        assert flat[path].dtype == value.dtype, path
        if exact:
            assert np.asarray(flat[path]).tobytes() == np.asarray(value).tobytes(), path
        else:
            assert_close(flat[path], value)


def groups(model):
    return [s for s in InitPlan(Snapshot(model, None).variables).steps if isinstance(s, Group)]


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_grouped_draws_equal_one_by_one_draws_eagerly_and_under_jit(name):
    key = jax.random.key(7)
    # Every shape and dtype in one model: a group of three alike variables each (a group never
    # mixes shapes or dtypes), and one program to compile per side. The reference, the draws
    # one by one, is jitted too: dispatched op by op it costs seconds.
    model = Banks(RANDOM[name])
    init_fn = mx.transform(model).init
    assert [len(g.slots) for g in groups(model)] == [3] * len(SHAPES) * len(DTYPES)
    single = jax.jit(lambda k: one_by_one(model, k))(key)
    assert_same_draws(init_fn(key), single, name in EXACT)
    assert_same_draws(jax.jit(init_fn)(key), single, name in EXACT)


def numpy_uniform(key, path, shape, dtype, minval, maxval):
    """The uniform draw recomputed with numpy, which rounds every float32 operation once and
    fuses none: the bits every CPU must give."""
    n = int(np.prod(shape))
    bits = np.asarray(jax.random.bits(fold_in_path(key, path), (n,), jnp.uint32))
    f = ((bits >> 9) | np.uint32(0x3F800000)).view(np.float32)  # [1, 2), exactly
    scale = maxval - minval
    values = (f - np.float32(1.0 - minval / scale)) * np.float32(scale)
    low = np.float32(minval)
    values = np.clip(values, low, np.nextafter(np.float32(maxval), low))
    return values.reshape(shape).astype(dtype)


def glorot_bounds(shape):
    """``glorot_uniform``'s bounds, computed as it does: ``sqrt(3 / fan_avg)``."""
    receptive = math.prod(shape[:-2])
    bound = math.sqrt(3.0) * math.sqrt(1.0 / ((shape[-2] + shape[-1]) * receptive / 2))
    return -bound, bound


@pytest.mark.parametrize(
    "init, bounds",
    [
        (initializers.uniform(-0.2, 0.3), lambda shape: (-0.2, 0.3)),
        (initializers.glorot_uniform(), glorot_bounds),
    ],
    ids=["uniform", "glorot_uniform"],
)
def test_uniform_draws_have_the_bits_of_one_rounding_per_operation_grouped_or_not(init, bounds):
    # The compiled draws, alone or grouped, eager or jitted, equal numpy's: no compiler choice
    # (a fused multiply-add, the vector width) changes them, on any CPU.
    key = jax.random.key(7)
    for dtype in (jnp.float32, jnp.float16):
        model = Bank(init, (2, 3, 4, 6), dtype)
        init_fn, _ = mx.transform(model)
        for variables in (init_fn(key), jax.jit(init_fn)(key)):
            for path, value in flatten_variables(variables).items():
                expected = numpy_uniform(key, path, value.shape, dtype, *bounds(value.shape))
                assert np.asarray(value).tobytes() == expected.tobytes(), (path, dtype)


def test_float64_and_legacy_keys():
    # float64 needs jax_enable_x64; the plan is made per setting, so flipping it is safe here.
    for init, exact in [(initializers.he_uniform(), True), (initializers.he_normal(), False)]:
        model = Bank(init, (4, 6), jnp.float64)
        init_fn, _ = mx.transform(model)
        with jax.enable_x64(True):
            for key in (jax.random.key(3), jax.random.PRNGKey(3)):
                variables = init_fn(key)
                assert flatten_variables(variables)[("params", "alike", "0")].dtype == jnp.float64
                assert_same_draws(variables, one_by_one(model, key), exact)
        assert init_fn(jax.random.key(3))["params"]["alone"].dtype == jnp.float32


def test_equal_factories_share_a_group_and_unequal_settings_do_not():
    assert initializers.he_uniform() == initializers.he_uniform()
    assert hash(initializers.normal(0.02)) == hash(initializers.normal(0.02))
    assert initializers.glorot_uniform() == initializers.variance_scaling(1.0, "fan_avg", "uniform")
    assert initializers.normal(0.02) != initializers.normal(0.03)
    assert initializers.uniform(0.0, 1.0) != initializers.uniform(-0.0, 1.0)  # other bits
    assert initializers.uniform(0, 1) != initializers.uniform(0.0, 1.0)
    assert repr(initializers.normal(0.02)) == "normal(stddev=0.02, mean=0.0)"

    class Net(mx.Module):
        def __init__(self):
            super().__init__()
            self.layers = [
                mx.Dense(8, 8, kernel_init=initializers.normal(0.02)) for _ in range(4)
            ] + [mx.Dense(8, 8, kernel_init=initializers.normal(0.05))]

    (group,) = groups(Net())
    assert len(group.slots) == 4


def test_the_model_default_mlp_draws_its_kernels_once_and_its_biases_alone():
    class MLP(mx.Module):
        def __init__(self, n):
            super().__init__()
            self.layers = [mx.Dense(16, 16) for _ in range(n)]

    model = MLP(10)
    (group,) = groups(model)
    assert len(group.slots) == 10  # zeros are not vectorizable: XLA merges their fills
    jaxpr = jax.make_jaxpr(mx.transform(model).init)(jax.random.key(0))
    deeper = jax.make_jaxpr(mx.transform(MLP(40)).init)(jax.random.key(0))
    # One sampler for all kernels: 30 more layers add only a bias fill each (no key: zeros
    # ignores it) and the gather that takes its kernel out of the stacked draw, not a sampler
    # each; the kernels' keys are one batched fold_in for all of them.
    assert len(deeper.eqns) - len(jaxpr.eqns) == 2 * 30
    assert_same_draws(  # Dense's kernels: lecun_normal
        mx.transform(model).init(jax.random.key(1)), one_by_one(model, jax.random.key(1)), False
    )


def test_fixed_values_and_unmarked_initializers_are_drawn_alone():
    custom_calls = []

    def custom(key, shape, dtype=jnp.float32):  # a Python side effect: must run per variable
        custom_calls.append(shape)
        return jax.random.normal(key, shape, dtype)

    class Net(mx.Module):
        def __init__(self):
            super().__init__()
            self.a = [mx.Parameter(custom, (3,)) for _ in range(3)]
            self.b = [mx.Parameter(initializers.normal(), (3,)) for _ in range(3)]

    model = Net()
    fixed = jnp.arange(3.0)
    model.b[1].value = fixed
    init_fn, _ = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    assert len(custom_calls) == 3
    (group,) = groups(model)
    assert [len(group.slots)] == [2]
    np.testing.assert_array_equal(variables["params"]["b"]["1"], fixed)
    assert variables["params"]["b"]["1"] is not model.b[1].value
    expected = one_by_one(model, jax.random.key(0))
    expected[("params", "b", "1")] = fixed
    assert_same_draws(variables, expected, exact=False)


def test_a_group_under_vmap_over_root_keys_and_eval_shape():
    model = Bank(initializers.lecun_normal(), (4, 4), jnp.float32)
    init_fn, _ = mx.transform(model)
    keys = jax.random.split(jax.random.key(0), 2)
    stacked = jax.vmap(init_fn)(keys)
    for i in range(2):
        one = jax.tree.map(lambda a, i=i: a[i], stacked)
        assert_same_draws(one, one_by_one(model, keys[i]), exact=False)
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    assert abstract["params"]["alike"]["2"].shape == (4, 4)


def test_errors_of_a_group_name_the_first_variable():
    model = Bank(initializers.he_uniform(), (4,), jnp.float32)  # 1-d: no fans
    model.alone = mx.Parameter(initializers.zeros, (1,))
    init_fn, _ = mx.transform(model)
    for fn in (init_fn, jax.jit(init_fn)):
        with pytest.raises(errors.LayerConfigError) as info:
            fn(jax.random.key(0))
        assert "params/alike/0" in "".join(getattr(info.value, "__notes__", []))


def test_a_vectorizable_initializer_of_the_wrong_shape_names_the_variable():
    class Wrong:
        vectorizable = True

        def __call__(self, key, shape, dtype=jnp.float32):
            return jnp.zeros((2,), dtype)

    model = Bank(Wrong(), (3,), jnp.float32)
    for fn in (mx.transform(model).init, jax.jit(mx.transform(model).init)):
        with pytest.raises(errors.VariableShapeError, match="alike/0"):
            fn(jax.random.key(0))


def test_large_groups_are_drawn_in_bounded_calls(monkeypatch):
    monkeypatch.setattr("metoryx._core.init.MAX_GROUP_ELEMENTS", 2 * 20)
    model = Bank(initializers.normal(), (4, 5), jnp.float32)
    model.alike.append(mx.Parameter(initializers.normal(), (4, 5)))
    assert [len(g.slots) for g in groups(model)] == [2, 2]
    init_fn, _ = mx.transform(model)
    assert_same_draws(init_fn(jax.random.key(0)), one_by_one(model, jax.random.key(0)), False)
    jitted = jax.jit(lambda k: one_by_one(model, k))(jax.random.key(0))
    assert_same_draws(jax.jit(init_fn)(jax.random.key(0)), jitted, exact=False)


@pytest.mark.parametrize("shape", [(), (1,), (6,), (7,), (1, 5), (3, 1, 2), (0, 4)])
def test_grouped_draws_of_any_shape_are_split_exactly_under_jit(shape):
    # Traced, each draw is gathered out of the stack by rows: of its first axis, or of a factor
    # of its size; one-element and empty draws are sliced.
    model = Bank(initializers.uniform(-1.0, 1.0), shape, jnp.float32)
    model.alike.append(mx.Parameter(initializers.uniform(-1.0, 1.0), shape))
    init_fn, _ = mx.transform(model)
    jitted = jax.jit(lambda k: one_by_one(model, k))(jax.random.key(4))
    assert_same_draws(jax.jit(init_fn)(jax.random.key(4)), jitted, exact=True)


def kernels(compiled_text):
    """The distinct bodies of the fused computations of an optimized HLO module: each is one
    kernel for XLA:CPU to compile, however many fusions call it."""
    bodies = set()
    for block in compiled_text.split("\n\n"):
        if block.startswith("%fused_computation") or block.startswith("%wrapped_"):
            body = re.sub(r"%[\w.-]+", "%", block.split("{", 1)[1])
            bodies.add(re.sub(r", metadata=\{[^}]*\}", "", body))
    return bodies


def test_jitted_init_compiles_as_many_kernels_for_40_layers_as_for_4():
    # What keeps jax.jit(init_fn) of a deep model quick to compile: the per-layer work (the
    # gathers that split the stacked draw, the bias fills) is one kernel body for all layers.
    class MLP(mx.Module):
        def __init__(self, n):
            super().__init__()
            self.layers = [mx.Dense(16, 16) for _ in range(n)]

    def compiled(n):
        init_fn = mx.transform(MLP(n)).init
        return jax.jit(init_fn).lower(jax.random.key(0)).compile().as_text()

    # The bodies differ only in the stack's length (4 or 40): their number is what counts.
    assert 0 < len(kernels(compiled(40))) == len(kernels(compiled(4)))


def test_an_eager_init_is_one_compiled_program_with_the_bits_of_the_jitted_init():
    # Dispatched op by op, an eager init compiled each operation for each shape (~30 programs
    # for a 12-block GPT); now the draws of our initializers are one program, the very one
    # jax.jit(init_fn) compiles when every initializer is ours: the same bits.
    class Block(mx.Module):
        def __init__(self):
            super().__init__()
            self.norm = mx.LayerNorm(8)
            self.fc = mx.Dense(8, 8)

    class Net(mx.Module):
        def __init__(self):
            super().__init__()
            self.embed = mx.Embed(50, 8)
            self.stacked = mx.Repeat(Block, 3)
            self.layers = [mx.Dense(8, 8) for _ in range(2)]
            self.head = mx.Dense(8, 5, kernel_init=initializers.glorot_uniform())

    init_fn = mx.transform(Net()).init
    key = jax.random.key(3)
    _program.cache_clear()  # an equal model's program, made by another test, would be reused
    eager, count = compiles_of(init_fn, key)
    assert count == 1
    # One program (the draws' jaxpr is jax.jit(init_fn)'s, the same operations in the same
    # fusions), so the same bits on any CPU.
    assert_same_bits(eager, jax.jit(init_fn)(key))


def test_without_jit_the_draws_are_dispatched_one_by_one_with_the_same_values():
    # The op-by-op path (eager vmap and slices) still serves jax.disable_jit() and the error
    # path: the same draws, within the rounding of other kernels for the normal samplers.
    models = [Bank(RANDOM[name], (5, 7), jnp.float32) for name in ("he_uniform", "normal")]
    for model, exact in zip(models, (True, False), strict=True):
        init_fn = mx.transform(model).init
        with jax.disable_jit():
            eager = init_fn(jax.random.key(2))
        assert_same_draws(eager, flatten_variables(init_fn(jax.random.key(2))), exact)


class Counting:
    """A pure, vectorizable uniform draw that counts its calls: under the init program's jit it
    is called only while the program is traced. Hashable by identity, as any function is, and
    shared by mx.transform's deep copy, as a function is (else each snapshot holds another
    object, equal only to itself: a program per transform)."""

    vectorizable = True

    def __init__(self, scale=1.0):
        self.scale = scale
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, key, shape, dtype=jnp.float32):
        self.calls += 1
        return self.scale * jax.random.uniform(key, shape, dtype)


class Counted(mx.Module):
    def __init__(self, init, d=6, dtype=jnp.float32, n=3):
        super().__init__()
        self.layers = [mx.Dense(d, d, kernel_init=init, param_dtype=dtype) for _ in range(n)]
        self.norm = mx.LayerNorm(d, param_dtype=dtype)


def compiles_of(fn, *args):
    """``fn(*args)`` and the number of XLA compiles it made."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        out = jax.block_until_ready(fn(*args))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return out, len(compiles)


def assert_same_bits(variables, expected):
    flat, other = flatten_variables(variables), flatten_variables(expected)
    assert flat.keys() == other.keys()
    for path, value in other.items():
        assert np.asarray(flat[path]).tobytes() == np.asarray(value).tobytes(), path


def test_equal_models_share_one_init_program_across_transforms():
    init = Counting()
    key = jax.random.key(4)
    model = Counted(init)
    first, count = compiles_of(mx.transform(model).init, key)
    assert init.calls == 1 and count == 1  # one trace (a group of 3 kernels), one compile
    # The same model transformed again, and a separately built equal one: no trace, no compile.
    for again in (model, Counted(init)):
        variables, count = compiles_of(mx.transform(again).init, key)
        assert init.calls == 1 and count == 0
        assert_same_bits(variables, first)
    assert_same_bits(first, jax.jit(mx.transform(model).init)(key))


@pytest.mark.parametrize(
    "change",
    [
        {"d": 5},  # a shape
        {"dtype": jnp.bfloat16},  # a dtype
        {"n": 4},  # one more variable, hence one more path
    ],
)
def test_a_model_that_differs_gets_its_own_program(change):
    init = Counting()
    key = jax.random.key(5)
    compiles_of(mx.transform(Counted(init)).init, key)
    other = Counted(init, **change)
    variables, count = compiles_of(mx.transform(other).init, key)
    assert init.calls == 2 and count == 1
    assert_same_bits(variables, jax.jit(mx.transform(other).init)(key))
    with jax.disable_jit():
        assert_same_bits(variables, mx.transform(other).init(key))  # uniform: exact


def test_another_initializer_object_gets_its_own_program_and_its_values():
    # Keyed by the initializer object itself (by ==, as groups are; a function or an object
    # without __eq__ is equal only to itself), never by its name or repr: two closures of one
    # factory with other constants are two programs, each with its own values.
    key = jax.random.key(6)
    first, second = Counting(1.0), Counting(-2.0)
    a = mx.transform(Counted(first)).init(key)
    b, count = compiles_of(mx.transform(Counted(second)).init, key)
    assert (first.calls, second.calls, count) == (1, 1, 1)
    for path, value in flatten_variables(a).items():
        if path[-1] == "kernel":  # one uniform draw times 1 or -2, powers of two: exact
            np.testing.assert_array_equal(flatten_variables(b)[path], -2.0 * value)


def test_an_unhashable_initializer_is_drawn_eagerly_with_the_values_of_the_jitted_init():
    class Unhashable(Counting):
        __hash__ = None  # e.g. a dataclass with eq=True: it cannot key the program cache

        def __eq__(self, other):
            return self is other

    init = Unhashable()
    model = Counted(init)
    key = jax.random.key(7)
    variables = mx.transform(model).init(key)
    assert init.calls == 3  # one call per variable, eagerly (no group: it cannot key a dict)
    assert_same_bits(variables, jax.jit(mx.transform(model).init)(key))
    with jax.disable_jit():
        assert_same_bits(variables, mx.transform(model).init(key))
    mx.transform(model).init(key)
    assert init.calls == 3 + 3 + 3 + 3  # every eager init calls it again: nothing is cached
