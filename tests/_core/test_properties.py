"""Property tests over randomly generated module trees.

Hypothesis draws a *spec* (plain data): modules holding Parameters, States, lists, tuples and
dicts of them, config values, and ties (a later attribute holding a variable or a finished
module seen earlier). Each example builds fresh objects from its spec, so nothing is shared
between examples. A small reference interpreter, written independently of metoryx, gives the
expected variable paths (first path in attribute order), the output and the updated States.
"""

import jax
import jax.numpy as jnp
import numpy as np
from _tolerance import assert_close  # tests/_tolerance.py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metoryx as mx

SHAPES = [(), (2,), (3,), (2, 3)]
COLLECTIONS = ["stats", "cache"]
NAMES = ["a", "b", "c", "d", "e"]
KEYS = ["k", "z", 0, 1, "1"]  # 1 and "1" give the same path: drawn unique by str
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


class Gen(mx.Module):
    """A module with the given attributes; its call consumes them all and bumps its States."""

    def __init__(self, attrs):
        super().__init__()
        for name, value in attrs:
            setattr(self, name, value)
        self.names = [name for name, _ in attrs]
        self.bumped = [n for n, v in attrs if isinstance(v, mx.State) and v.mutable]

    def __call__(self, x):
        total = jnp.zeros((), jnp.float32)
        for name in self.names:
            total = total + _consume(getattr(self, name), x)
        for name in self.bumped:
            setattr(self, name, getattr(self, name) + x)
        return total


def _consume(value, x):
    if isinstance(value, jax.Array):
        return jnp.sum(value) * x
    if isinstance(value, Gen):
        return value(x)
    if isinstance(value, (list, tuple)):
        return sum((_consume(v, x) for v in value), jnp.zeros((), jnp.float32))
    if isinstance(value, dict):
        return sum((_consume(v, x) for v in value.values()), jnp.zeros((), jnp.float32))
    return jnp.zeros((), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Specs and building


@st.composite
def value_spec(draw, depth):
    kinds = ["param"] * 3 + ["state"] * 3 + ["tie"] * 3 + ["config"]
    if depth < 3:
        kinds += ["module"] * 3 + ["list", "tuple", "dict"]
    kind = draw(st.sampled_from(kinds))
    if kind == "param":
        return ("param", draw(st.integers(0, len(SHAPES) - 1)))
    if kind == "state":
        return (
            "state",
            draw(st.integers(0, len(SHAPES) - 1)),
            draw(st.sampled_from(COLLECTIONS)),
            draw(st.booleans()),
        )
    if kind == "tie":
        return ("tie", draw(st.integers(0, 50)))
    if kind == "config":
        return ("config", draw(st.sampled_from([3, "relu", None, 0.5, (1, "x")])))
    if kind == "module":
        return draw(module_spec(depth))
    children = st.lists(value_spec(depth + 1), max_size=3)
    if kind in ("list", "tuple"):
        return (kind, draw(children))
    keys = draw(st.lists(st.sampled_from(KEYS), unique_by=str, max_size=3))
    return ("dict", [(k, draw(value_spec(depth + 1))) for k in keys])


@st.composite
def module_spec(draw, depth=0):
    size = (2, 4) if depth == 0 else (1, 3)
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=size[0], max_size=size[1]))
    return ("module", [(name, draw(value_spec(depth + 1))) for name in names])


def build(spec, pool):
    """Objects from a spec; ``pool`` collects variables and finished modules for ties."""
    kind = spec[0]
    if kind == "param":
        obj = mx.Parameter(mx.initializers.normal(), SHAPES[spec[1]])
    elif kind == "state":
        obj = mx.State(spec[2], mx.initializers.normal(), SHAPES[spec[1]], mutable=spec[3])
    elif kind == "tie":
        return pool[spec[1] % len(pool)] if pool else "untied"
    elif kind == "config":
        return spec[1]
    elif kind == "list":
        return [build(c, pool) for c in spec[1]]
    elif kind == "tuple":
        return tuple(build(c, pool) for c in spec[1])
    elif kind == "dict":
        return {k: build(c, pool) for k, c in spec[1]}
    else:
        obj = Gen([(name, build(c, pool)) for name, c in spec[1]])
    pool.append(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# The reference: paths and semantics, without metoryx


def reference_paths(root):
    """``[(path, variable)]`` of unique variables, first path in attribute order."""
    found, seen = [], set()

    def visit(value, path):
        if isinstance(value, mx.Variable):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(((value.collection, *path), value))
        elif isinstance(value, Gen):
            if id(value) not in seen:
                seen.add(id(value))
                for name in value.names:
                    visit(getattr(value, name), (*path, name))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, (*path, str(i)))
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, (*path, str(key)))

    visit(root, ())
    return found


def reference_call(module, x, current):
    def read(value):  # a container's arrays are read all at once, as apply_fn does
        if isinstance(value, mx.Variable):
            return current[id(value)]
        if isinstance(value, (list, tuple)):
            return [read(v) for v in value]
        if isinstance(value, dict):
            return {k: read(v) for k, v in value.items()}
        return value

    def consume(value):
        if isinstance(value, np.ndarray):
            return float(value.sum()) * x
        if isinstance(value, Gen):
            return reference_call(value, x, current)
        if isinstance(value, (list, tuple)):
            return sum(consume(v) for v in value)
        if isinstance(value, dict):
            return sum(consume(v) for v in value.values())
        return 0.0

    total = sum(consume(read(getattr(module, name))) for name in module.names)
    for name in module.bumped:
        var = getattr(module, name)
        current[id(var)] = current[id(var)] + x
    return total


def lookup(variables, path):
    for part in path:
        variables = variables[part]
    return variables


def flat_paths(variables):
    return {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}


# ---------------------------------------------------------------------------------------------
# Properties


@SETTINGS
@given(spec=module_spec(), seed=st.integers(0, 2**31 - 1))
def test_init_apply_round_trip_matches_the_reference(spec, seed):
    root = build(spec, [])
    expected = reference_paths(root)
    init_fn, apply_fn = mx.transform(root)
    variables = init_fn(seed)

    # Paths are the attribute paths, each unique variable stored once (tying invariant).
    assert flat_paths(variables) == {path for path, _ in expected}
    assert len(jax.tree.leaves(variables)) == len(expected) == len({id(v) for _, v in expected})
    for path, var in expected:
        leaf = lookup(variables, path)
        assert leaf.shape == var.shape and leaf.dtype == var.dtype

    x = jnp.float32(0.5)
    out, new = apply_fn(variables, None, x)
    assert jax.tree.structure(new) == jax.tree.structure(variables)

    current = {id(var): np.asarray(lookup(variables, path), np.float64) for path, var in expected}
    want = reference_call(root, 0.5, current)
    # The output is a float32 sum, which may cancel: bounded by the size and number of its
    # terms, found by the reference run on their magnitudes and on ones.
    scale = reference_call(root, 0.5, {i: np.asarray(abs(v)) for i, v in current.items()})
    n = round(reference_call(root, 1.0, {i: np.ones_like(v) for i, v in current.items()}))
    assert_close(out, want, n=n, scale=scale)
    for path, var in expected:
        if isinstance(var, mx.Parameter) or not var.mutable:
            assert lookup(new, path) is lookup(variables, path)
        assert_close(lookup(new, path), current[id(var)], n=2)  # bumped once per holder

    # jit equals eager
    jit_out, jit_new = jax.jit(apply_fn)(variables, None, x)
    assert_close(jit_out, out, n=n, scale=scale)
    assert jax.tree.structure(jit_new) == jax.tree.structure(new)
    for a, b in zip(jax.tree.leaves(jit_new), jax.tree.leaves(new), strict=True):
        assert_close(a, b, n=2)


@SETTINGS
@given(spec=module_spec(), seed=st.integers(0, 2**31 - 1))
def test_snapshot_isolation(spec, seed):
    pool = []
    root = build(spec, pool)
    init_fn, apply_fn = mx.transform(root)
    before = init_fn(seed)
    out_before, new_before = apply_fn(before, None, jnp.float32(1.0))

    # Edit everything: fix every value, add a Parameter to every module, drop an attribute.
    for obj in pool:
        if isinstance(obj, mx.Variable):
            obj.value = jnp.full(obj.shape, 9.0)
        else:
            obj.extra = mx.Parameter(mx.initializers.ones, (2,))
            obj.names = [*obj.names, "extra"]
    delattr(root, root.names[0])
    root.names = root.names[1:]

    after = init_fn(seed)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    out_after, new_after = apply_fn(before, None, jnp.float32(1.0))
    np.testing.assert_array_equal(out_after, out_before)
    for a, b in zip(jax.tree.leaves(new_after), jax.tree.leaves(new_before), strict=True):
        np.testing.assert_array_equal(a, b)
