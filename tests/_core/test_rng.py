"""Tests of metoryx/_core/rng.py: path-derived init keys and the named streams of apply_fn."""

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx import errors
from metoryx._core.rng import fold_in_path, path_hash


class Draws(mx.Module):
    """Returns keys from named streams, as layers needing randomness would draw them."""

    def __call__(self, *streams):
        return [mx.next_rng_key(s) for s in streams]


def key_bits(key):
    return bytes(np.asarray(jax.random.key_data(key)).data)


def draws(rngs, *streams, jit=False):
    _, apply_fn = mx.transform(Draws())
    fn = jax.jit(apply_fn, static_argnums=tuple(range(2, 2 + len(streams)))) if jit else apply_fn
    return [key_bits(k) for k in fn({}, rngs, *streams)[0]]


# ---------------------------------------------------------------------------------------------
# Init keys from path hashes


def test_path_hash_is_64_bits_and_frozen():
    # Paths are the storage format: this value must never change, in any process or version.
    assert path_hash(("params", "fc1", "kernel")) == (3837865343, 2339501262)
    assert path_hash(("params", "fc1", "kernel")) == _reference_hash("params/fc1/kernel")
    key = fold_in_path(jax.random.key(0), ("params", "fc1", "kernel"))
    assert np.asarray(jax.random.key_data(key)).tolist() == [3517519748, 2970053052]
    high, low = path_hash(("params", "layers", "0", "kernel"))
    assert 0 <= high < 2**32 and 0 <= low < 2**32
    assert path_hash(("params", "a", "b")) != path_hash(("params", "b", "a"))


def _reference_hash(text):
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


_DIGEST_SCRIPT = textwrap.dedent(
    """
    import hashlib, jax, numpy as np, metoryx as mx

    class Net(mx.Module):
        def __init__(self):
            self.layers = [mx.Dense(3, 4) for _ in range(3)]
            self.heads = {"left": mx.Dense(4, 2), "right": mx.Dense(4, 2)}
            self.stat = mx.State("batch_stats", mx.initializers.normal(), (4,))

    v = mx.init(Net())(jax.random.key(42))
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(v)[0], key=lambda p: str(p[0])):
        h.update(str(path).encode() + np.asarray(leaf).tobytes())
    print(h.hexdigest())
    """
)


def test_init_is_bit_identical_across_processes_and_hash_seeds():
    processes = []
    for seed in ("0", "12345"):  # two processes at once, with different str hashing
        env = dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_repo_root(), env.get("PYTHONPATH")]))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", _DIGEST_SCRIPT],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    digests = set()
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        digests.add(out.strip())
    assert len(digests) == 1
    namespace = {}
    exec(_DIGEST_SCRIPT.replace("print(h.hexdigest())", "digest = h.hexdigest()"), namespace)
    assert namespace["digest"] in digests


def _repo_root():
    """The directory holding the metoryx package under test, for the subprocess's path."""
    return os.path.dirname(os.path.dirname(os.path.abspath(mx.__file__)))


# ---------------------------------------------------------------------------------------------
# Streams in apply_fn


def test_next_rng_key_differs_per_call_and_per_stream_and_repeats_across_runs():
    key = jax.random.key(0)
    first = draws(key, None, None, "dropout", "dropout", "noise")
    assert len(set(first)) == 5
    assert draws(key, None, None, "dropout", "dropout", "noise") == first
    assert draws(jax.random.key(1), None, None, "dropout", "dropout", "noise")[0] != first[0]


def test_streams_count_independently():
    key = jax.random.key(0)
    # Drawing from another stream in between does not move a stream's sequence.
    a = draws(key, "dropout", "dropout")
    b = draws(key, "dropout", "noise", "noise", "dropout")
    assert [b[0], b[3]] == a


def test_default_stream_name_and_none_are_the_same():
    key = jax.random.key(0)
    assert draws(key, None, None) == draws(key, "default", "default")


def test_jit_equals_eager():
    key = jax.random.key(3)
    assert draws(key, None, "dropout", jit=True) == draws(key, None, "dropout")


def test_named_stream_overrides_the_derived_one():
    default = jax.random.key(0)
    derived = draws(default, "dropout")
    explicit = draws(mx.PRNGKeys(default, dropout=jax.random.key(9)), "dropout", None)
    assert explicit[0] != derived[0]
    assert explicit[1] == draws(default, None)[0]  # the default stream is unaffected
    only = draws(mx.PRNGKeys(dropout=jax.random.key(9)), "dropout")
    assert only == explicit[:1]


def test_legacy_keys_give_legacy_keys():
    got = []

    class Probe(mx.Module):
        def __call__(self):
            got.append(mx.next_rng_key())
            got.append(mx.next_rng_key("dropout"))

    _, apply_fn = mx.transform(Probe())
    apply_fn({}, jax.random.PRNGKey(0))
    assert all(k.dtype == jnp.uint32 and k.shape == (2,) for k in got)
    assert not np.array_equal(got[0], got[1])
    got.clear()
    apply_fn({}, jax.random.key(0))
    assert all(jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) for k in got)


def test_plain_dict_of_streams_works_like_prng_keys():
    keys = {"default": jax.random.key(0), "dropout": jax.random.key(1)}
    assert draws(keys, None, "dropout") == draws(
        mx.PRNGKeys(keys["default"], dropout=keys["dropout"]), None, "dropout"
    )


def test_dropout_uses_the_key_and_is_deterministic_per_key():
    class Drop(mx.Module):
        def __call__(self, x):
            return mx.dropout(x, 0.5, is_training=True)

    _, apply_fn = mx.transform(Drop())
    x = jnp.ones(64)
    a = apply_fn({}, jax.random.key(0), x)[0]
    b = apply_fn({}, jax.random.key(0), x)[0]
    c = apply_fn({}, jax.random.key(1), x)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    keys = jax.random.split(jax.random.key(0), 2)
    masks = jax.jit(jax.vmap(apply_fn, in_axes=(None, 0, None)))({}, keys, x)[0]
    assert not np.array_equal(masks[0], masks[1])


# ---------------------------------------------------------------------------------------------
# Errors


class Block(mx.Module):
    def __call__(self, x):
        return mx.dropout(x, 0.5, is_training=True)


class Net(mx.Module):
    def __init__(self):
        self.block = Block()

    def __call__(self, x):
        return self.block(x)


@pytest.mark.parametrize("rngs", [None, {"noise": jax.random.key(0)}])
def test_layer_without_key_raises_naming_layer_path_and_stream(rngs):
    _, apply_fn = mx.transform(Net())
    with pytest.raises(errors.MissingRngError) as info:
        apply_fn({}, rngs, jnp.ones(4))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "Block at 'block'" in message and "'dropout'" in message
    assert ("rngs=None" if rngs is None else "'noise'") in message


def test_missing_key_under_jit_raises_the_same():
    _, apply_fn = mx.transform(Net())
    with pytest.raises(errors.MissingRngError, match="Block at 'block'"):
        jax.jit(apply_fn)({}, None, jnp.ones(4))


def test_missing_key_in_root_module_and_in_a_function():
    _, apply_fn = mx.transform(Draws())
    with pytest.raises(errors.MissingRngError, match=r"Draws \(root\).*'noise'"):
        apply_fn({}, None, "noise")


def test_next_rng_key_outside_apply():
    with pytest.raises(errors.ApplyContextError) as info:
        mx.next_rng_key("dropout")
    assert isinstance(info.value, RuntimeError)
    assert "'dropout'" in str(info.value) and "apply_fn" in str(info.value)


@pytest.mark.parametrize(
    "rngs",
    # np.float32 (a scalar type) has a `dtype` attribute that is no dtype: it once got through
    # to jnp.issubdtype, a raw TypeError.
    [0, 1.5, "key", jnp.zeros(3), jnp.zeros((2,), jnp.int32), [jax.random.key(0)], np.float32],
)
def test_bad_rngs_are_an_rngs_type_error(rngs):
    _, apply_fn = mx.transform(Draws())
    with pytest.raises(errors.RngsTypeError) as info:
        apply_fn({}, rngs)
    assert isinstance(info.value, TypeError)
    assert "mx.PRNGKeys" in str(info.value) and type(rngs).__name__ in str(info.value)


@pytest.mark.parametrize(
    "rngs", [{"dropout": 0}, {"dropout": jnp.zeros(3)}, {1: jax.random.key(0)}]
)
def test_bad_dict_of_streams_is_an_rngs_type_error(rngs):
    _, apply_fn = mx.transform(Draws())
    with pytest.raises(errors.RngsTypeError, match="mx.PRNGKeys"):
        apply_fn({}, rngs)


BATCHES = {
    "typed": jax.random.split(jax.random.key(0), 4),
    "legacy": jax.random.split(jax.random.PRNGKey(0), 4),
    "typed 2-d": jax.random.split(jax.random.key(0), (2, 3)),
}


@pytest.mark.parametrize("kind", BATCHES)
def test_init_fn_given_a_batch_of_keys_points_to_vmap(kind):
    init_fn = mx.init(mx.Dense(2, 3))
    keys = BATCHES[kind]
    with pytest.raises(errors.RngsTypeError, match=r"jax\.vmap\(init_fn\)\(keys\)") as info:
        init_fn(keys)
    assert "batch of keys of shape" in str(info.value)
    assert jax.vmap(init_fn)(keys.reshape(-1, *keys.shape[keys.ndim - (kind == "legacy") :]))


@pytest.mark.parametrize("rngs", [BATCHES["typed"], {"dropout": BATCHES["legacy"]}])
def test_apply_fn_given_a_batch_of_keys_points_to_vmap(rngs):
    _, apply_fn = mx.transform(Draws())
    with pytest.raises(errors.RngsTypeError, match=r"jax\.vmap\(apply_fn") as info:
        apply_fn({}, rngs)
    assert "shape (4,)" in str(info.value)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_an_int_seed_past_64_bits_is_an_rngs_type_error(seed):
    with pytest.raises(errors.RngsTypeError, match="64 bits"):
        mx.init(mx.Dense(2, 3))(seed)


def test_prng_keys_builds_a_plain_dict_and_checks_its_keys():
    k0, k1 = jax.random.key(0), jax.random.key(1)
    keys = mx.PRNGKeys(k0, dropout=k1)
    assert type(keys) is dict and keys == {"default": k0, "dropout": k1}
    assert mx.PRNGKeys(dropout=k1) == {"dropout": k1}
    with pytest.raises(errors.RngsTypeError, match="'dropout'"):
        mx.PRNGKeys(k0, dropout=3)
