"""mx.modules and mx.replace: finding sub-modules by path and type, and replacing them in a copy."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metoryx as mx
from metoryx import errors


class Block(mx.Module):
    def __init__(self, size: int = 4):
        self.fc = mx.Dense(size, size)
        self.norm = mx.LayerNorm(size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.fc(x))


class Net(mx.Module):
    def __init__(self):
        self.embed = mx.Dense(2, 4)
        self.blocks = [Block(), Block()]
        self.heads = {"cls": mx.Dense(4, 3), "box": mx.Dense(4, 2)}
        self.out_norm = mx.LayerNorm(4)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.heads["cls"](self.out_norm(x))


class Adapter(mx.Module):
    """A user's adapter: the old layer plus a small learned correction."""

    def __init__(self, base: mx.Dense):
        self.base = base
        self.delta = mx.Dense(base.in_size, base.out_size, kernel_init=mx.initializers.zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.delta(x)


class Marker(mx.Module):
    """A replacement without children, so that nothing of the replaced module stays."""


def _paths(model: mx.Module, type: Any = None) -> list[str]:
    return ["/".join(p) for p, _ in mx.modules(model, type)]


# --- mx.modules --------------------------------------------------------------------------------


def test_modules_in_attribute_order_with_paths_as_tuples():
    found = list(mx.modules(Net()))
    assert [(p, type(m).__name__) for p, m in found] == [
        ((), "Net"),
        (("embed",), "Dense"),
        (("blocks", "0"), "Block"),
        (("blocks", "0", "fc"), "Dense"),
        (("blocks", "0", "norm"), "LayerNorm"),
        (("blocks", "1"), "Block"),
        (("blocks", "1", "fc"), "Dense"),
        (("blocks", "1", "norm"), "LayerNorm"),
        (("heads", "cls"), "Dense"),
        (("heads", "box"), "Dense"),
        (("out_norm",), "LayerNorm"),
    ]


def test_modules_gives_the_models_own_objects():
    net = Net()
    found = dict(mx.modules(net))
    assert found[("blocks", "1", "fc")] is net.blocks[1].fc
    assert found[()] is net


def test_a_tied_module_comes_once_at_its_first_path():
    net = Net()
    net.blocks[1].fc = net.embed  # tied: one module at two paths
    net.heads["box"] = net.embed
    dense_paths = _paths(net, mx.Dense)
    assert dense_paths == ["embed", "blocks/0/fc", "heads/cls"]


def test_type_filter_takes_a_class_a_tuple_and_subclasses():
    class Special(mx.Dense):
        pass

    net = Net()
    net.heads["box"] = Special(4, 2)
    assert _paths(net, mx.LayerNorm) == ["blocks/0/norm", "blocks/1/norm", "out_norm"]
    assert _paths(net, (Block, mx.LayerNorm)) == [
        "blocks/0",
        "blocks/0/norm",
        "blocks/1",
        "blocks/1/norm",
        "out_norm",
    ]
    assert _paths(net, Special) == ["heads/box"]
    assert "heads/box" in _paths(net, mx.Dense)
    assert _paths(net, mx.BatchNorm) == []


@pytest.mark.parametrize(
    "wrap",
    [
        lambda block: mx.Repeat(block, 3),
        lambda block: mx.checkpoint(block),
        lambda block: mx.vmap(block, variable_axes={"params": 0}, axis_size=2),
    ],
    ids=["Repeat", "checkpoint", "vmap"],
)
def test_a_lifted_template_shows_once_at_the_wrappers_path(wrap):
    class Deep(mx.Module):
        def __init__(self):
            self.blocks = wrap(Block())
            self.head = mx.Dense(4, 1)

    found = [("/".join(p), type(m).__name__) for p, m in mx.modules(Deep())]
    wrapper = type(Deep().blocks).__name__
    assert found == [
        ("", "Deep"),
        ("blocks", wrapper),
        ("blocks", "Block"),
        ("blocks/fc", "Dense"),
        ("blocks/norm", "LayerNorm"),
        ("head", "Dense"),
    ]


@pytest.mark.parametrize(
    "bad", [int, object, 3, "Dense", (), (mx.Dense, int), mx.Dense(2, 2), [mx.Dense]]
)
def test_modules_refuses_a_type_that_is_no_module_class(bad):
    with pytest.raises(errors.LayerConfigError, match=r"mx.modules: `type` must be"):
        mx.modules(Net(), bad)


def test_modules_names_a_layer_instance_given_as_type():
    with pytest.raises(errors.LayerConfigError, match=r"Pass its class \(Dense\)"):
        mx.modules(Net(), mx.Dense(2, 2))  # type: ignore[call-overload]


def test_modules_refuses_what_is_no_model():
    with pytest.raises(errors.ModuleStructureError, match="Expected an mx.Module"):
        mx.modules({"fc": mx.Dense(2, 2)})  # type: ignore[arg-type]


# --- mx.replace: what it returns ----------------------------------------------------------------


def test_replace_returns_a_copy_and_leaves_the_model_untouched():
    net = Net()
    before = [(p, m) for p, m in mx.modules(net)]
    result = mx.replace(net, mx.LayerNorm, lambda path, m: mx.RMSNorm(m.size))
    assert [(p, m) for p, m in mx.modules(net)] == before  # same objects at the same paths
    assert _paths(result, mx.LayerNorm) == []
    assert _paths(result, mx.RMSNorm) == ["blocks/0/norm", "blocks/1/norm", "out_norm"]
    kept = dict(mx.modules(result))
    originals = {id(m) for _, m in before}
    assert not any(id(m) in originals for m in kept.values())  # the rest is copied too
    assert _paths(result) == _paths(net)


def test_replace_shares_fixed_values_as_transform_does():
    net = Net()
    pretrained = jnp.arange(8.0).reshape(2, 4)
    net.embed.kernel.value = pretrained
    result = mx.replace(net, "heads/cls", lambda path, m: mx.Dense(4, 7))
    assert result.embed.kernel.value is pretrained
    variables = mx.init(result)(jax.random.key(0))
    np.testing.assert_array_equal(variables["params"]["embed"]["kernel"], pretrained)
    assert variables["params"]["heads"]["cls"]["kernel"].shape == (4, 7)


def test_fn_gets_the_path_and_the_copy_of_the_module():
    net = Net()
    calls = []

    def fn(path, module):
        calls.append((path, module))
        return module

    mx.replace(net, mx.Dense, fn)
    assert [p for p, _ in calls] == [
        ("embed",),
        ("blocks", "0", "fc"),
        ("blocks", "1", "fc"),
        ("heads", "cls"),
        ("heads", "box"),
    ]
    assert all(type(m) is mx.Dense for _, m in calls)
    assert calls[0][1] is not net.embed
    calls[0][1].out_size = 99  # editing what fn got does not reach the model
    assert net.embed.out_size == 4


def test_wrapping_every_dense_in_an_adapter_does_not_recurse():
    net = Net()
    result = mx.replace(net, mx.Dense, lambda path, dense: Adapter(dense))
    adapted = ["embed", "blocks/0/fc", "blocks/1/fc", "heads/cls", "heads/box"]
    assert _paths(result, Adapter) == adapted
    assert _paths(result, mx.Dense)[:2] == ["embed/base", "embed/delta"]
    # The adapters start with zero deltas: on the original weights, the original output.
    original = mx.init(net)(jax.random.key(0))
    init_fn, apply_fn = mx.transform(result)
    variables = init_fn(jax.random.key(1))
    for path in adapted:
        *parents, name = path.split("/")
        old, new = original["params"], variables["params"]
        for part in parents:
            old, new = old[part], new[part]
        new[name]["base"] = old[name]
    x = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    y, _ = apply_fn(variables, None, x)
    y_original, _ = mx.apply(net)(original, None, x)
    np.testing.assert_array_equal(y, y_original)  # adding exact zeros changes no bit


def test_a_transparent_wrapper_keeps_the_wrapped_variables_at_their_paths():
    class Scaled(mx.Module):
        """Holds the old layer at its own path, as an adapter built on replace does."""

        _transparent = "base"

        def __init__(self, base: mx.Module):
            self.base = base
            self.gain = mx.Parameter(mx.initializers.ones, ())

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.base(x) * self.gain

    net = Net()
    result = mx.replace(net, "heads/cls", lambda path, dense: Scaled(dense))
    params = mx.init(result)(jax.random.key(0))["params"]
    assert sorted(params["heads"]["cls"]) == ["bias", "gain", "kernel"]
    original = mx.init(net)(jax.random.key(0))["params"]
    np.testing.assert_array_equal(
        params["heads"]["cls"]["kernel"], original["heads"]["cls"]["kernel"]
    )


# --- tied modules, containers, lifted wrappers, the root -----------------------------------------


def test_tied_modules_are_replaced_once_and_stay_tied():
    net = Net()
    net.blocks[1].fc = net.blocks[0].fc
    calls = []

    def fn(path, dense):
        calls.append(path)
        return mx.Dense(4, 4, use_bias=False)

    result = mx.replace(net, lambda path, m: path[-1:] == ("fc",), fn)
    assert calls == [("blocks", "0", "fc")]
    assert result.blocks[1].fc is result.blocks[0].fc
    assert result.blocks[0].fc.kernel is not net.blocks[0].fc.kernel
    params = mx.init(result)(jax.random.key(0))["params"]
    assert sorted(params["blocks"]["0"]["fc"]) == ["kernel"]
    assert "fc" not in params["blocks"]["1"]  # one variable, at its first path


def test_a_tied_module_inside_a_replaced_one_follows_it():
    net = Net()
    net.out_norm = net.blocks[0].norm  # tied into the first block
    result = mx.replace(net, "blocks/0", lambda path, block: Adapter(block.fc))
    # The replaced block's norm is gone from blocks/0, and out_norm still holds the copy.
    assert type(result.out_norm) is mx.LayerNorm
    assert result.out_norm is not net.out_norm
    params = mx.init(result)(jax.random.key(0))["params"]
    assert "out_norm" in params and "norm" not in params["blocks"]["0"]


class Pair(NamedTuple):
    left: mx.Module
    right: mx.Module


def test_replace_inside_lists_tuples_named_tuples_and_dicts():
    class Holder(mx.Module):
        def __init__(self):
            self.items = [mx.LayerNorm(2), (mx.LayerNorm(2), mx.Dense(2, 2))]
            self.pair = Pair(mx.Dense(2, 2), mx.LayerNorm(2))
            self.table = {"a": mx.LayerNorm(2), 3: {"b": mx.LayerNorm(2)}}

    result = mx.replace(Holder(), mx.LayerNorm, lambda path, m: Marker())
    assert _paths(result, Marker) == ["items/0", "items/1/0", "pair/1", "table/a", "table/3/b"]
    assert type(result.items[1]) is tuple and type(result.items[1][1]) is mx.Dense
    assert type(result.pair) is Pair and type(result.pair.left) is mx.Dense
    assert list(result.table) == ["a", 3]
    assert type(result.table[3]["b"]) is Marker


def test_replace_the_template_inside_repeat():
    class Deep(mx.Module):
        def __init__(self):
            self.blocks = mx.Repeat(Block, 3)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.blocks(x)

    result = mx.replace(Deep(), mx.LayerNorm, lambda path, m: mx.RMSNorm(m.size))
    assert type(result.blocks.module.norm) is mx.RMSNorm
    result = mx.replace(result, "blocks/fc", lambda path, dense: Adapter(dense))
    init_fn, apply_fn = mx.transform(result)
    variables = init_fn(jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, variables["params"]["blocks"])
    assert shapes == {
        "fc": {
            "base": {"bias": (3, 4), "kernel": (3, 4, 4)},
            "delta": {"bias": (3, 4), "kernel": (3, 4, 4)},
        },
        "norm": {"scale": (3, 4)},
    }
    y, _ = jax.jit(apply_fn)(variables, None, jnp.ones((2, 4)))
    assert y.shape == (2, 4)


def test_replace_the_whole_repeat_by_its_path():
    class Deep(mx.Module):
        def __init__(self):
            self.blocks = mx.Repeat(Block, 3)

    result = mx.replace(Deep(), "blocks", lambda path, rep: Marker())
    assert [type(m).__name__ for _, m in mx.modules(result)] == ["Deep", "Marker"]


def test_the_root_may_match():
    net = Net()
    seen = []

    def fn(path, root):
        seen.append((path, root))
        return Adapter(mx.Dense(2, 3))

    result = mx.replace(net, Net, fn)
    assert type(result) is Adapter
    assert seen[0][0] == () and type(seen[0][1]) is Net and seen[0][1] is not net
    assert type(mx.replace(net, "**", lambda path, m: Marker())) is Marker


# --- where: globs and predicates ------------------------------------------------------------------


def test_where_glob_matches_module_paths():
    net = Net()
    assert _paths(mx.replace(net, "blocks/*/norm", lambda p, m: Marker()), Marker) == [
        "blocks/0/norm",
        "blocks/1/norm",
    ]
    assert _paths(mx.replace(net, "heads/*", lambda p, m: Marker()), Marker) == [
        "heads/cls",
        "heads/box",
    ]
    assert _paths(mx.replace(net, "**/fc", lambda p, m: Marker()), Marker) == [
        "blocks/0/fc",
        "blocks/1/fc",
    ]
    # '**' matches no level too: 'blocks/**' picks each block, then searches nothing inside.
    assert _paths(mx.replace(net, "blocks/**", lambda p, m: Marker()), Marker) == [
        "blocks/0",
        "blocks/1",
    ]


def test_where_predicate_sees_path_and_module():
    net = Net()
    wide = mx.replace(
        net,
        lambda path, m: isinstance(m, mx.Dense) and path[0] == "heads",
        lambda path, m: mx.Dense(4, 8),
    )
    assert wide.heads["cls"].out_size == 8 and wide.heads["box"].out_size == 8
    assert wide.embed.out_size == 4
    numpy_bool = mx.replace(
        net, lambda path, m: np.bool_(path == ("embed",)), lambda p, m: Marker()
    )
    assert type(numpy_bool.embed) is Marker


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (3, "`where` must be a module class"),
        (None, "`where` must be a module class"),
        (int, "`where` must be a module class"),
        ((), "`where` must be a module class"),
        ((mx.Dense, "head"), "`where` must be a module class"),
        (["head"], "`where` must be a module class"),
        (mx.Dense(2, 2), r"Pass its class \(Dense\)"),
        ("", "empty part"),
        ("heads//cls", "empty part"),
        ("blocks/**x", "'\\*\\*' spans whole levels"),
        (len, "cannot be called with two arguments"),
        (lambda path: True, "cannot be called with two arguments"),
    ],
)
def test_bad_where_is_refused_with_the_forms_it_takes(where, says):
    with pytest.raises(errors.LayerConfigError, match=says):
        mx.replace(Net(), where, lambda path, m: m)


@pytest.mark.parametrize(
    ("fn", "says"),
    [
        (None, "is not a function"),
        (mx.Dense(2, 2), "is not a function"),
        (str, "a class that does not make modules"),
        (lambda module: module, "cannot be called with two arguments"),
    ],
)
def test_bad_fn_is_refused(fn, says):
    with pytest.raises(errors.LayerConfigError, match=rf"`fn` must be a function .*{says}"):
        mx.replace(Net(), mx.Dense, fn)


def test_a_predicate_must_return_a_bool():
    with pytest.raises(
        errors.LayerConfigError, match=r"returned tuple \(\) for the Net at '<root>'"
    ):
        mx.replace(Net(), lambda path, m: path, lambda path, m: m)


def test_fn_returning_no_module_names_the_path_and_the_model_stays_as_it_was():
    net = Net()
    before = [(p, m) for p, m in mx.modules(net)]
    returns = iter([Marker(), jnp.zeros(3)])
    with pytest.raises(errors.ReplacementError) as info:
        mx.replace(net, mx.Dense, lambda path, m: next(returns))  # type: ignore[arg-type]
    message = str(info.value)
    assert "the Dense at 'blocks/0/fc'" in message and "ArrayImpl" in message
    assert "mx.Identity()" in message
    assert [(p, m) for p, m in mx.modules(net)] == before


def test_a_type_matching_nothing_lists_the_types_held():
    with pytest.raises(errors.NoMatchError) as info:
        mx.replace(Net(), (mx.BatchNorm, mx.Conv), lambda path, m: m)
    message = str(info.value)
    assert "no module is a BatchNorm or Conv" in message
    assert "Net (1), Dense (5), Block (2), LayerNorm (3)" in message


def test_a_glob_matching_nothing_lists_the_closest_paths():
    with pytest.raises(errors.NoMatchError, match=r"the closest paths: heads/cls, heads/box"):
        mx.replace(Net(), "heads/clss", lambda path, m: m)
    with pytest.raises(errors.NoMatchError, match=r"its module paths begin: embed, blocks/0"):
        mx.replace(Net(), "decoder/zzz/**", lambda path, m: m)


def test_a_glob_naming_the_second_path_of_a_tied_module_points_to_the_first():
    net = Net()
    net.heads["box"] = net.heads["cls"]
    with pytest.raises(errors.NoMatchError, match="matched at its first one"):
        mx.replace(net, "heads/box", lambda path, m: m)


def test_a_predicate_matching_nothing_says_how_many_it_saw():
    with pytest.raises(errors.NoMatchError, match=r"returned False for all 11 modules"):
        mx.replace(Net(), lambda path, m: False, lambda path, m: m)


def test_a_replacement_that_breaks_the_tree_is_named_at_replace():
    net = Net()

    def holds_the_root(path, m):
        cyclic = Adapter(m)
        cyclic.back = net  # the original root: the result would contain itself's twin
        return cyclic

    result = mx.replace(net, "embed", holds_the_root)  # a twin is no cycle: allowed
    assert type(result.embed.back) is Net

    class Loop(mx.Module):
        pass

    def loops(path, m):
        loop = Loop()
        loop.me = loop
        return loop

    with pytest.raises(errors.ModuleStructureError, match="refers back to its ancestor"):
        mx.replace(net, "embed", loops)


# --- property: random trees ---------------------------------------------------------------------


class Box(mx.Module):
    def __init__(self, attrs):
        for name, value in attrs:
            setattr(self, name, value)


class Crate(Box):
    """A subclass of Box: replacing Box replaces every Crate too."""


LEAVES = ["Dense", "LayerNorm"]
NAMES = ["a", "b", "c", "d"]


def _specs():
    """A Box or Crate at the root, holding leaves and holders in attributes, lists and dicts."""
    leaf = st.sampled_from(LEAVES)

    def holders(inner, min_size=0):
        slot = st.one_of(
            inner,
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: ("list", xs)),
            st.dictionaries(st.sampled_from(NAMES), inner, min_size=1, max_size=3).map(
                lambda d: ("dict", d)
            ),
        )
        attrs = st.lists(
            st.tuples(st.sampled_from(NAMES), slot),
            min_size=min_size,
            max_size=3,
            unique_by=lambda t: t[0],
        )
        return st.tuples(st.sampled_from(["Box", "Crate"]), attrs)

    return holders(st.recursive(leaf, holders, max_leaves=8), min_size=1)


def _build(spec):
    if spec == "Dense":
        return mx.Dense(2, 2)
    if spec == "LayerNorm":
        return mx.LayerNorm(2)
    kind, attrs = spec
    cls = Box if kind == "Box" else Crate
    return cls([(name, _build_slot(value)) for name, value in attrs])


def _build_slot(value):
    if isinstance(value, tuple) and value[0] == "list":
        return [_build(v) for v in value[1]]
    if isinstance(value, tuple) and value[0] == "dict":
        return {k: _build(v) for k, v in value[1].items()}
    return _build(value)


def _expected(spec, path, target):
    """The (path, type name) list of mx.modules after replacing ``target`` by Marker, computed
    from the spec alone."""
    kind = spec if isinstance(spec, str) else spec[0]
    if kind == target or (target == "Box" and kind == "Crate"):
        return [(path, "Marker")]
    found = [(path, kind)]
    if isinstance(spec, str):
        return found
    for name, value in spec[1]:
        if isinstance(value, tuple) and value[0] == "list":
            for i, item in enumerate(value[1]):
                found += _expected(item, (*path, name, str(i)), target)
        elif isinstance(value, tuple) and value[0] == "dict":
            for key, item in value[1].items():
                found += _expected(item, (*path, name, key), target)
        else:
            found += _expected(value, (*path, name), target)
    return found


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=_specs(), target=st.sampled_from(["Dense", "LayerNorm", "Box", "Crate"]))
def test_replacing_a_type_removes_it_and_keeps_every_other_path(spec, target):
    model = _build(spec)
    listed = [(p, type(m).__name__) for p, m in mx.modules(model)]
    assert listed == _expected(spec, (), None)
    cls = {"Dense": mx.Dense, "LayerNorm": mx.LayerNorm, "Box": Box, "Crate": Crate}[target]
    expected = _expected(spec, (), target)
    if not any(kind == "Marker" for _, kind in expected):
        with pytest.raises(errors.NoMatchError):
            mx.replace(model, cls, lambda path, m: Marker())
        return
    result = mx.replace(model, cls, lambda path, m: Marker())
    assert [(p, type(m).__name__) for p, m in mx.modules(result)] == expected
    assert list(mx.modules(result, cls)) == []
    assert [(p, type(m).__name__) for p, m in mx.modules(model)] == listed
