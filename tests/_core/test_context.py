"""Tests of metoryx/_core/context.py: the frozen execution world, threads and re-entrancy."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors


class Counter(mx.Module):
    """A Parameter, a mutable State and a read-only State."""

    def __init__(self):
        self.w = mx.Parameter(mx.initializers.ones, (3,))
        self.count = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.frozen = mx.State("consts", mx.initializers.ones, (3,), mutable=False)

    def __call__(self, x):
        self.count = self.count + 1
        return x * self.w


class Wrapper(mx.Module):
    def __init__(self):
        self.block = Counter()

    def __call__(self, action, *args):
        return action(self.block, *args)


def run(action, *args):
    """Runs ``action(block, *args)`` inside apply_fn, ``block`` being the Counter at 'block'."""
    init_fn, apply_fn = mx.transform(Wrapper())
    return apply_fn(init_fn(0), None, action, *args)


# ---------------------------------------------------------------------------------------------
# The frozen execution world


def _set_config(m):
    m.scale = 2.0


def _set_submodule(m):
    m.w2 = mx.Dense(2, 2)


def test_assigning_a_plain_attribute_names_path_attribute_and_state():
    with pytest.raises(errors.ImmutableModuleError) as info:
        run(_set_config)
    assert isinstance(info.value, AttributeError)
    message = str(info.value)
    assert "Counter at 'block'" in message and "'scale'" in message and "mx.State" in message


def test_assigning_a_new_submodule_or_a_config_attribute_of_the_root_is_an_error():
    with pytest.raises(errors.ImmutableModuleError, match="'w2'"):
        run(_set_submodule)

    class Root(mx.Module):
        def __init__(self):
            self.rate = 0.5

        def __call__(self):
            self.rate = 0.1

    with pytest.raises(errors.ImmutableModuleError, match=r"Root \(root\)"):
        mx.apply(Root())({}, None)


def test_assigning_a_parameter_is_an_error_naming_its_path():
    def assign(m):
        m.w = jnp.zeros(3)

    with pytest.raises(errors.ImmutableModuleError) as info:
        run(assign)
    message = str(info.value)
    assert "params/block/w" in message and "Parameter" in message and "mx.State" in message


def test_assigning_a_read_only_state_is_an_error():
    def assign(m):
        m.frozen = jnp.zeros(3)

    with pytest.raises(errors.ImmutableModuleError) as info:
        run(assign)
    assert "consts/block/frozen" in str(info.value) and "read-only" in str(info.value)


def test_assigning_a_state_with_the_wrong_shape_names_path_expected_and_got():
    def assign(m):
        m.count = jnp.zeros((2,), jnp.int32)

    with pytest.raises(errors.VariableShapeError) as info:
        run(assign)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "counters/block/count" in message and "()" in message and "(2,)" in message


def test_assigned_state_is_cast_to_its_dtype():
    def assign(m):
        m.count = jnp.asarray(7.9, jnp.float32)

    _, new = run(assign)
    assert new["counters"]["block"]["count"].dtype == jnp.int32
    assert int(new["counters"]["block"]["count"]) == 7


def test_deleting_an_attribute_is_an_error():
    def delete(m):
        del m.w

    with pytest.raises(errors.ImmutableModuleError) as info:
        run(delete)
    assert "'w'" in str(info.value) and "Counter at 'block'" in str(info.value)


def test_errors_inside_apply_leave_no_frame_behind():
    with pytest.raises(errors.ImmutableModuleError):
        run(_set_config)
    with pytest.raises(errors.ApplyContextError):
        mx.next_rng_key()


def test_snapshot_arrays_cannot_escape_apply():
    init_fn, apply_fn = mx.transform(Counter(), method=lambda m: m)
    snapshot, _ = apply_fn(init_fn(0), None)
    with pytest.raises(errors.ApplyContextError) as info:
        _ = snapshot.w
    assert isinstance(info.value, RuntimeError)
    assert "Counter (root).w" in str(info.value) and "apply_fn" in str(info.value)


class Containers(mx.Module):
    def __init__(self):
        self.mixed = [
            mx.Parameter(mx.initializers.ones, (2,)),
            mx.State("s", mx.initializers.zeros, (2,)),
        ]
        self.named = {"a": mx.State("s", mx.initializers.zeros, (2,)), "cfg": "x"}

    def __call__(self, action):
        return action(self)


def _apply_containers(action):
    init_fn, apply_fn = mx.transform(Containers())
    return apply_fn(init_fn(0), None, action)[1]


def test_containers_of_states_are_updated_by_assigning_the_container():
    def update(m):
        m.mixed = [m.mixed[0], m.mixed[1] + 1]  # the Parameter passed back unchanged
        m.named = {"a": m.named["a"] + 2, "cfg": "x"}

    new = _apply_containers(update)
    np.testing.assert_array_equal(new["s"]["mixed"]["1"], [1, 1])
    np.testing.assert_array_equal(new["s"]["named"]["a"], [2, 2])
    np.testing.assert_array_equal(new["params"]["mixed"]["0"], [1, 1])


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (lambda m: setattr(m, "mixed", [m.mixed[0] + 1, m.mixed[1]]), r"mixed\[0\].*Parameter"),
        (lambda m: setattr(m, "mixed", [m.mixed[1]]), "length 2"),
        (lambda m: setattr(m, "named", {"a": m.named["a"]}), "keys"),
        (lambda m: setattr(m, "named", {"a": m.named["a"], "cfg": "y"}), "configuration"),
    ],
)
def test_containers_keep_their_structure_and_frozen_entries(action, match):
    with pytest.raises(errors.ImmutableModuleError, match=match):
        _apply_containers(action)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.named.__setitem__("a", m.named["a"] + 1),
        lambda m: m.named.update(a=m.named["a"]),
        lambda m: m.named.pop("a"),
        lambda m: m.mixed.__setitem__(1, m.mixed[1] + 1),
        lambda m: m.mixed.append(m.mixed[1]),
        lambda m: m.mixed.sort(),
    ],
)
def test_item_edits_of_a_container_of_variables_raise_instead_of_being_lost(edit):
    with pytest.raises(
        errors.ImmutableModuleError, match=r"Containers \(root\)\.(named|mixed).*whole"
    ):
        _apply_containers(edit)


def test_containers_of_variables_flatten_like_lists_and_dicts():
    def read(m):
        assert jax.tree.map(jnp.shape, m.mixed) == [(2,), (2,)]  # a plain list comes back
        assert jax.tree.map(jnp.shape, m.named) == {"a": (2,), "cfg": ()}
        return sum(jnp.sum(a) for a in jax.tree.leaves(m.mixed))

    init_fn, apply_fn = mx.transform(Containers())
    total, _ = jax.jit(apply_fn, static_argnums=2)(init_fn(0), None, read)
    assert float(total) == 2.0  # the Parameter of ones and the State of zeros


# ---------------------------------------------------------------------------------------------
# Threads


class Slow(mx.Module):
    """Reads its variables before and after a sleep, so concurrent calls interleave."""

    def __init__(self):
        self.w = mx.Parameter(mx.initializers.ones, (3,))
        self.total = mx.State("stats", mx.initializers.zeros, (3,))

    def __call__(self, x):
        first = self.w
        time.sleep(0.01)
        self.total = self.total + x
        time.sleep(0.01)
        return first * x + self.w + _key_sum()


def _key_sum():
    """A number made from this call's first key: differs between the threads' keys."""
    return (jnp.sum(jax.random.key_data(mx.next_rng_key())) % 1000).astype(jnp.float32)


def test_eight_threads_apply_concurrently_and_get_their_own_answers():
    init_fn, apply_fn = mx.transform(Slow())
    jobs = []
    for i in range(8):
        v = init_fn(i)
        v["params"]["w"] = jnp.full((3,), float(i))
        v["stats"]["total"] = jnp.full((3,), 10.0 * i)
        jobs.append((v, jax.random.key(i), jnp.arange(3.0) + i))
    expected = [apply_fn(*job) for job in jobs]  # sequential reference
    results = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        results[i] = apply_fn(*jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1]["stats"]["total"], want[1]["stats"]["total"])
    np.testing.assert_array_equal(results[5][1]["stats"]["total"], 50.0 + jnp.arange(3.0) + 5)


def test_threads_running_the_jitted_apply():
    init_fn, apply_fn = mx.transform(Counter())
    jitted = jax.jit(apply_fn)
    v = init_fn(0)
    xs = [jnp.full((3,), float(i)) for i in range(8)]
    results = [None] * 8

    def work(i):
        results[i] = jitted(v, None, xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (y, new) in enumerate(results):
        np.testing.assert_array_equal(y, xs[i])
        assert int(new["counters"]["count"]) == 1


# ---------------------------------------------------------------------------------------------
# Re-entrancy


def test_transformed_model_applied_inside_another_models_method():
    inner_init, inner_apply = mx.transform(Counter())

    class Outer(mx.Module):
        def __init__(self):
            self.scale = mx.Parameter(mx.initializers.ones, (3,))
            self.calls = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

        def __call__(self, inner_variables, x):
            y, inner_new = inner_apply(inner_variables, mx.next_rng_key(), x)
            # After the inner call this module still reads its own frame.
            self.calls = self.calls + 1
            key = mx.next_rng_key()
            return y * self.scale, inner_new, key

    outer_init, outer_apply = mx.transform(Outer())
    inner_v = inner_init(0)
    inner_v["params"]["w"] = jnp.array([1.0, 2.0, 3.0])
    outer_v = outer_init(0)
    outer_v["params"]["scale"] = jnp.full((3,), 10.0)

    (y, inner_new, key), outer_new = outer_apply(outer_v, jax.random.key(0), inner_v, jnp.ones(3))
    np.testing.assert_array_equal(y, [10.0, 20.0, 30.0])
    assert int(inner_new["counters"]["count"]) == 1
    assert int(outer_new["counters"]["calls"]) == 1
    # The outer stream continued its own count: its second draw, not its first.
    first, second = mx.apply(_TwoDraws())({}, jax.random.key(0))[0]
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(second))
    assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(first))

    jitted = jax.jit(outer_apply)(outer_v, jax.random.key(0), inner_v, jnp.ones(3))
    np.testing.assert_array_equal(jitted[0][0], y)
    assert int(jitted[0][1]["counters"]["count"]) == 1


class _TwoDraws(mx.Module):
    def __call__(self):
        return mx.next_rng_key(), mx.next_rng_key()


def test_a_model_applied_recursively_inside_itself():
    holder = {}

    class Recursive(mx.Module):
        def __init__(self):
            self.depth_seen = mx.State("counters", mx.initializers.zeros, (), jnp.int32)

        def __call__(self, variables, depth):
            self.depth_seen = self.depth_seen + depth
            if depth == 0:
                return jnp.zeros(())
            out, _ = holder["apply"](variables, None, variables, depth - 1)
            self.depth_seen = self.depth_seen + 100  # still this call's frame
            return out + 1.0

    init_fn, apply_fn = mx.transform(Recursive())
    holder["apply"] = apply_fn
    v = init_fn(0)
    out, new = apply_fn(v, None, v, 3)
    assert float(out) == 3.0
    assert int(new["counters"]["depth_seen"]) == 103
