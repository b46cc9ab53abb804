"""Tests of metoryx/filters.py: filter specs, filter/partition/combine and optax_labels."""

import fnmatch

import jax
import jax.numpy as jnp
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metoryx as mx
from metoryx import errors


class Block(mx.Module):
    def __init__(self):
        self.attn = mx.Dense(4, 4)
        self.norm = mx.LayerNorm(4)

    def __call__(self, x):
        return self.norm(self.attn(x))


class Net(mx.Module):
    def __init__(self):
        self.encoder = [Block(), Block()]
        self.bn = mx.BatchNorm(4)
        self.head = mx.Dense(4, 2)

    def __call__(self, x, is_training=False):
        for block in self.encoder:
            x = block(x)
        return self.head(self.bn(x, is_training))


@pytest.fixture(scope="module")
def net():
    model = Net()
    mx.tag(model.encoder[0], "backbone")
    variables = mx.init(model)(jax.random.key(0))
    return model, variables, mx.variable_info(model)


def _paths(tree):
    return sorted(
        "/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    )


# --- what each kind of spec selects ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("batch_stats", ["batch_stats/bn/mean", "batch_stats/bn/var"]),
        ("params/head", ["params/head/bias", "params/head/kernel"]),
        (
            "params/encoder/*/attn/kernel",
            ["params/encoder/0/attn/kernel", "params/encoder/1/attn/kernel"],
        ),
        (
            "**/kernel",
            ["params/encoder/0/attn/kernel", "params/encoder/1/attn/kernel", "params/head/kernel"],
        ),
        ("params/**/norm/s?ale", ["params/encoder/0/norm/scale", "params/encoder/1/norm/scale"]),
        ("params/encoder/[!0]/norm", ["params/encoder/1/norm/bias", "params/encoder/1/norm/scale"]),
    ],
)
def test_a_string_is_a_glob_over_paths_and_their_prefixes(net, spec, expected):
    _, variables, _ = net
    assert _paths(mx.filter(variables, spec)) == expected


def test_a_module_class_selects_variables_inside_such_modules_at_any_depth(net):
    _, variables, info = net
    assert _paths(mx.filter(variables, mx.LayerNorm, info)) == [
        "params/encoder/0/norm/bias",
        "params/encoder/0/norm/scale",
        "params/encoder/1/norm/bias",
        "params/encoder/1/norm/scale",
    ]
    block = _paths(mx.filter(variables, Block, info))
    assert len(block) == 8 and all(p.startswith("params/encoder/") for p in block)
    # A class that is only an ancestor of everything selects everything.
    assert len(_paths(mx.filter(variables, Net, info))) == len(jax.tree.leaves(variables))


def test_tags_collections_and_predicates(net):
    _, variables, info = net
    assert _paths(mx.filter(variables, mx.filters.tag("backbone"), info)) == [
        "params/encoder/0/attn/bias",
        "params/encoder/0/attn/kernel",
        "params/encoder/0/norm/bias",
        "params/encoder/0/norm/scale",
    ]
    assert _paths(mx.filter(variables, mx.filters.collection("batch_stats"))) == [
        "batch_stats/bn/mean",
        "batch_stats/bn/var",
    ]
    seen = []

    def big(path, record):
        seen.append((path, record))
        return record.size >= 16

    assert _paths(mx.filter(variables, big, info)) == [
        "params/encoder/0/attn/kernel",
        "params/encoder/1/attn/kernel",
    ]
    assert all(isinstance(p, tuple) and r.path == p for p, r in seen)
    # Without info a predicate gets None.
    assert _paths(mx.filter(variables, lambda p, i: i is None and p[-1] == "mean")) == [
        "batch_stats/bn/mean"
    ]


def test_combinations_and_operators(net):
    _, variables, info = net
    kernels_not_backbone = mx.filters.all_of(
        "**/kernel", mx.filters.not_(mx.filters.tag("backbone"))
    )
    expected = ["params/encoder/1/attn/kernel", "params/head/kernel"]
    assert _paths(mx.filter(variables, kernels_not_backbone, info)) == expected
    assert _paths(mx.filter(variables, "**/kernel" & ~mx.filters.tag("backbone"), info)) == expected
    either = _paths(mx.filter(variables, ("params/head", "batch_stats")))
    assert either == _paths(mx.filter(variables, mx.filters.path("params/head") | "batch_stats"))
    assert len(either) == 4
    assert repr(mx.filters.path("a") | mx.LayerNorm) == "any_of(path('a'), LayerNorm)"


def test_trainable_and_frozen(net):
    model, _, _ = net
    model = Net()
    mx.freeze(model.encoder)
    variables = mx.init(model)(jax.random.key(0))
    info = mx.variable_info(model)
    trainable, rest = mx.partition(variables, mx.filters.trainable, info)
    assert _paths(trainable) == [
        "params/bn/bias",
        "params/bn/scale",
        "params/head/bias",
        "params/head/kernel",
    ]
    assert _paths(mx.filter(variables, mx.filters.frozen, info)) == [
        p for p in _paths(rest) if p.startswith("params/")
    ]


# --- partition and combine ------------------------------------------------------------------


def test_partition_keeps_the_same_arrays_and_combine_restores_exactly(net):
    _, variables, info = net
    selected, rest = mx.partition(variables, mx.filters.tag("backbone"), info)
    assert set(_paths(selected)).isdisjoint(_paths(rest))
    back = mx.combine(selected, rest)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    assert all(
        a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True)
    )


def test_partition_of_a_jitted_gradient_tree(net):
    _, variables, info = net
    trainable, frozen = mx.partition(variables, mx.filters.tag("backbone"), info)

    @jax.jit
    def grads(trainable, frozen):
        return jax.grad(lambda t: sum(jnp.sum(a) for a in jax.tree.leaves(mx.combine(t, frozen))))(
            trainable
        )

    g = grads(trainable, frozen)
    assert jax.tree.structure(g) == jax.tree.structure(trainable)


def test_empty_dicts_survive_a_round_trip():
    tree = {"params": {"a": 1, "empty": {}}, "other": {}}
    selected, rest = mx.partition(tree, "params/a")
    assert selected == {"params": {"a": 1}}
    assert mx.combine(selected, rest) == tree


def test_combine_names_every_overlap_and_modifies_no_input():
    a = {"params": {"x": 1, "y": {"z": 2}}}
    b = {"params": {"x": 3, "y": 4}}
    with pytest.raises(errors.VariablesStructureError) as e:
        mx.combine(a, b)
    assert "params/x (in two parts)" in str(e.value)
    assert "params/y (a dict in one part)" in str(e.value)
    first, second = {"params": {"x": 1}}, {"params": {"w": 2}}
    assert mx.combine(first, second) == {"params": {"x": 1, "w": 2}}
    assert first == {"params": {"x": 1}} and second == {"params": {"w": 2}}
    with pytest.raises(errors.VariablesStructureError, match="part 1 is a list"):
        mx.combine(first, [1])


# --- errors ---------------------------------------------------------------------------------


def test_a_glob_that_matches_nothing_lists_near_misses(net):
    _, variables, _ = net
    with pytest.raises(errors.NoMatchError) as e:
        mx.filter(variables, "params/encoder/*/atn/kernel")
    message = str(e.value)
    assert "selects none of the 14 variables" in message
    assert "'params/encoder/0/attn/kernel'" in message and "'batch_stats', 'params'" in message


def test_a_tag_or_type_that_matches_nothing_lists_what_is_there(net):
    _, variables, info = net
    with pytest.raises(errors.NoMatchError, match=r"tags present are 'backbone' \(4\)"):
        mx.filter(variables, mx.filters.tag("backbon"), info)
    with pytest.raises(
        errors.NoMatchError, match="'BatchNorm', 'Block', 'Dense', 'LayerNorm', 'Net'"
    ):
        mx.filter(variables, mx.RMSNorm, info)
    with pytest.raises(errors.NoMatchError, match="No variable has a tag"):
        mx.filter(mx.init(mx.Dense(2, 2))(0), mx.filters.tag("x"), mx.variable_info(mx.Dense(2, 2)))
    with pytest.raises(errors.NoMatchError, match="selects every one of the 14"):
        mx.partition(variables, mx.filters.not_("*"))
    with pytest.raises(
        errors.NoMatchError,
        match=r"Alone, path\('batch_stats'\) selects 2; path\('params'\) selects 12",
    ):
        mx.filter(variables, mx.filters.all_of("batch_stats", "params"))
    with pytest.raises(errors.NoMatchError, match="predicate returned a false value for all 14"):
        mx.filter(variables, lambda p, i: False)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("params//x", "empty part"),
        ("/params", "empty part"),
        ("params/a**", r"'\*\*' spans whole levels"),
        ("params/[ab", "does not close"),
        ("", "empty part"),
        (3, "got int 3"),
        (jnp.float32, "must be an mx.Module subclass"),
        (int, "must be an mx.Module subclass"),
        ((), "needs at least one spec"),
    ],
)
def test_malformed_specs_are_refused(net, spec, match):
    _, variables, _ = net
    with pytest.raises(errors.FilterError, match=match):
        mx.filter(variables, spec)


def test_specs_that_read_info_need_it_and_it_must_fit(net):
    _, variables, info = net
    with pytest.raises(errors.FilterError, match="pass the variable info"):
        mx.filter(variables, mx.LayerNorm)
    with pytest.raises(errors.FilterError, match=r"with its collection level"):
        mx.filter(variables["params"], mx.LayerNorm, info)
    with pytest.raises(errors.FilterError, match="expected a variables dict"):
        mx.filter([1, 2], "params")
    with pytest.raises(errors.FilterError, match="one or more non-empty names"):
        mx.filters.tag()


# --- optax_labels ---------------------------------------------------------------------------


def test_optax_labels_give_each_variable_its_label(net):
    _, variables, info = net
    labels = mx.optax_labels(info, {"head": "params/head", "norms": mx.LayerNorm}, default="rest")
    tree = labels(variables)
    assert jax.tree.structure(tree) == jax.tree.structure(variables)
    assert tree["params"]["head"]["kernel"] == "head"
    assert tree["params"]["encoder"]["1"]["norm"]["scale"] == "norms"
    assert tree["batch_stats"]["bn"]["mean"] == "rest"
    # The same labels serve a part of the tree (the trainable partition).
    params = mx.filter(variables, "params")
    optimizer = optax.multi_transform(
        {"head": optax.adam(1e-3), "norms": optax.set_to_zero(), "rest": optax.sgd(0.1)}, labels
    )
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count and floats
        state = optimizer.init(params)
        updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert jnp.all(updates["params"]["encoder"]["0"]["norm"]["scale"] == 0)
    assert jnp.all(updates["params"]["encoder"]["0"]["attn"]["kernel"] == -0.1)


def test_optax_labels_errors(net):
    _, variables, info = net
    with pytest.raises(
        errors.FilterError, match=r"1 variable\(s\) have two labels: params/head/kernel"
    ):
        mx.optax_labels(info, {"a": "params/head", "b": "**/kernel"}, default="c")
    labels = mx.optax_labels(info, {"a": "params"})
    with pytest.raises(
        errors.FilterError, match=r"no label selects 2 variable\(s\): batch_stats/bn/mean"
    ):
        labels(variables)
    with pytest.raises(errors.NoMatchError, match="label 'a'"):
        mx.optax_labels(info, {"a": "params/haed"})
    with pytest.raises(errors.FilterError, match="must be a dict"):
        mx.optax_labels(info, ["params"])
    with pytest.raises(errors.FilterError, match="`default` must be a label"):
        mx.optax_labels(info, {"a": "params"}, default=0)


# --- properties -----------------------------------------------------------------------------

PARTS = ["params", "a", "b", "kernel", "bias", "0", "1"]


@st.composite
def trees(draw, depth=0):
    keys = draw(
        st.lists(st.sampled_from(PARTS), min_size=0 if depth else 1, max_size=4, unique=True)
    )
    tree = {}
    for key in keys:
        if depth < 3 and draw(st.booleans()):
            tree[key] = draw(trees(depth + 1))
        else:
            tree[key] = object()  # a distinct leaf: identity shows where it went
    return tree


PATTERN_PARTS = st.sampled_from([*PARTS, "*", "**", "?", "b*", "[ab]", "[!k]*", "ker*"])


def _reference_match(pattern, path):
    """Brute force: does some split of ``path`` match the parts of ``pattern``, with prefixes?"""

    def match(parts, rest):
        if not parts:
            return True  # a prefix of the path matched: the rest is below it
        if parts[0] == "**":
            return any(match(parts[1:], rest[k:]) for k in range(len(rest) + 1))
        return bool(rest) and fnmatch.fnmatchcase(rest[0], parts[0]) and match(parts[1:], rest[1:])

    return match(pattern.split("/"), list(path))


def _leaf_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key), value


@settings(max_examples=300, deadline=None)
@given(trees(), st.lists(PATTERN_PARTS, min_size=1, max_size=4))
def test_filter_agrees_with_brute_force_and_combine_inverts_partition(tree, parts):
    pattern = "/".join(parts)
    expected = {p: leaf for p, leaf in _leaf_paths(tree) if _reference_match(pattern, p)}
    if not expected:
        with pytest.raises(errors.NoMatchError, match="selects none"):
            mx.partition(tree, pattern)
        return
    selected, rest = mx.partition(tree, pattern)
    assert dict(_leaf_paths(selected)) == expected
    assert all(expected[p] is leaf for p, leaf in _leaf_paths(selected))
    assert not set(dict(_leaf_paths(rest))) & set(expected)
    back = mx.combine(selected, rest)
    assert back == tree  # same keys, same leaf objects, empty dicts included
    assert mx.combine(rest, selected) == tree


class Pair(mx.Module):
    def __init__(self, first, second):
        self.first, self.second = first, second


LEAF_LAYERS = {
    "dense": lambda: mx.Dense(2, 2),
    "norm": lambda: mx.LayerNorm(2),
    "bn": lambda: mx.BatchNorm(2),
}


@st.composite
def module_trees(draw, depth=0):
    """A random model: Pairs, lists and dicts of Dense, LayerNorm and BatchNorm layers."""
    kind = draw(
        st.sampled_from(["pair", "list", "dict", *LEAF_LAYERS] if depth < 3 else list(LEAF_LAYERS))
    )
    if kind in LEAF_LAYERS:
        return LEAF_LAYERS[kind]()
    children = [draw(module_trees(depth + 1)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "pair":
        return Pair(children[0], children[-1] if len(children) > 1 else mx.Dense(2, 2))
    container = Pair(
        mx.Dense(2, 2), children if kind == "list" else dict(zip("xyz", children, strict=False))
    )
    return container


@settings(max_examples=60, deadline=None)
@given(module_trees(), st.sampled_from([mx.Dense, mx.LayerNorm, mx.BatchNorm, Pair]), st.data())
def test_type_and_tag_filters_agree_with_the_module_tree(model, layer_type, data):
    # Tag a random set of modules, then pick variables by type and by tag.
    modules = list(mx.modules(model))
    tagged = data.draw(st.lists(st.sampled_from(modules), max_size=3))
    for _, module in tagged:
        mx.tag(module, "picked")
    variables = jax.eval_shape(mx.init(model), jax.random.key(0))  # shapes are enough here
    info = mx.variable_info(model)
    paths = [p for p, _ in _leaf_paths(variables)]

    def under(path, module_paths):
        return any(path[1 : 1 + len(m)] == m for m in module_paths)

    by_type = {
        p for p in paths if under(p, [m for m, obj in modules if isinstance(obj, layer_type)])
    }
    by_tag = {p for p in paths if under(p, [m for m, _ in tagged])}
    for spec, expected in ((layer_type, by_type), (mx.filters.tag("picked"), by_tag)):
        if not expected:
            with pytest.raises(errors.NoMatchError):
                mx.filter(variables, spec, info)
            continue
        selected, rest = mx.partition(variables, spec, info)
        assert {p for p, _ in _leaf_paths(selected)} == expected
        assert mx.combine(selected, rest) == variables
