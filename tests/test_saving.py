"""mx.save and mx.load: what round-trips, what like= restores and checks, what is refused."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from typing import NamedTuple

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import metoryx as mx

DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz,
]  # fmt: skip


def _bits(x):
    """dtype, shape and bytes: equal only for bit-identical arrays (NaNs included)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("key", str(jax.random.key_impl(x)), _bits(jax.random.key_data(x)))
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert [_bits(x) for x in jax.tree.leaves(a)] == [_bits(y) for y in jax.tree.leaves(b)]


def _random(dtype, shape, seed=0):
    """Arbitrary bit patterns of `dtype` (NaNs, infinities, subnormals)."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, (*shape, dtype.itemsize), np.uint8)
    return raw.view(dtype).reshape(shape) if dtype != np.bool_ else raw[..., 0] % 2 == 1


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "ckpt.safetensors")


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_bit_exactly(path, dtype):
    tree = {
        "a": _random(dtype, (3, 5)),
        "scalar": _random(dtype, ()),
        "empty": _random(dtype, (0, 2)),
    }
    mx.save(path, tree)
    back = mx.load(path)
    assert {k: _bits(v) for k, v in back.items()} == {k: _bits(v) for k, v in tree.items()}
    assert _bits(mx.load(path, like=tree)["a"]) == _bits(tree["a"])


def test_leaves_are_jax_arrays_and_64_bit_ones_numpy_without_x64(path):
    mx.save(
        path, {"f32": np.ones(2, np.float32), "f64": np.ones(2), "bf16": jnp.ones(2, jnp.bfloat16)}
    )
    back = mx.load(path)
    assert isinstance(back["f32"], jax.Array) and isinstance(back["bf16"], jax.Array)
    # jax_enable_x64 is off: a jax.Array would have become float32.
    assert type(back["f64"]) is np.ndarray and back["f64"].dtype == np.float64


def test_variables_of_a_model_round_trip(path):
    model = mx.Sequential(mx.Dense(3, 4), mx.BatchNorm(4), mx.Dense(4, 2))
    variables = mx.transform(model).init(jax.random.key(0))
    mx.save(path, variables)
    _same(mx.load(path), variables)


class Pair(NamedTuple):
    first: object
    second: object


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
    inside: object
    nothing: object


def test_training_state_with_optax_step_and_key(path):
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = opt.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes float and int32 (count)
        _, opt_state = opt.update(params, opt_state, params)  # a count of 1, moments not zero
    state = {"params": params, "opt": opt_state, "step": jnp.int32(7), "key": jax.random.key(3)}
    mx.save(path, state)
    back = mx.load(path, like=state)
    _same(back, state)
    assert type(back["opt"][1][0]) is type(opt_state[1][0])  # optax's ScaleByAdamState
    assert jax.random.key_impl(back["key"]) == jax.random.key_impl(state["key"])
    # The restored state keeps training: the same update as from the original.
    with jax.numpy_dtype_promotion("standard"):
        _same(opt.update(params, back["opt"], params), opt.update(params, opt_state, params))


def test_without_like_containers_come_back_as_documented(path):
    tree = {
        "z": Pair(np.ones(1), [np.zeros(2), ()]),
        "a": Box(np.ones(3), None),
        "ints": {2: np.ones(1), 1: np.zeros(1)},
        "empty": {},
        "key": jax.random.split(jax.random.key(0), 4),
    }
    mx.save(path, tree)
    back = mx.load(path)
    assert list(back) == ["z", "a", "ints", "empty", "key"]  # insertion order, not sorted
    assert list(back["z"]) == ["first", "second"] and isinstance(back["z"]["second"], list)
    assert back["z"]["second"][1] == ()
    assert set(back["a"]) == {"inside", "nothing"} and back["a"]["nothing"] is None
    assert list(back["ints"]) == [2, 1]  # int keys stay ints
    assert back["empty"] == {}
    assert back["key"].shape == (4,) and jnp.issubdtype(back["key"].dtype, jax.dtypes.prng_key)
    _same(mx.load(path, like=tree), tree)


def test_paths_are_tensor_names_readable_by_safetensors(path):
    tree = {
        "params": {"layer.0": {"kernel": np.ones((2, 2), np.float32)}},
        "opt": Pair([np.ones(1)], None),
    }
    mx.save(path, tree)
    flat = safetensors.numpy.load_file(path)
    assert sorted(flat) == ["opt/first/0", "params/layer.0/kernel"]
    np.testing.assert_array_equal(
        flat["params/layer.0/kernel"], tree["params"]["layer.0"]["kernel"]
    )


def test_metadata_round_trips(path):
    meta = {"epoch": 3, "config": {"lr": 1e-3, "layers": [4, 4]}, "note": "ünïcode"}
    mx.save(path, {"x": np.ones(1)}, metadata=meta)
    tree, back = mx.load(path, return_metadata=True)
    assert back == meta
    mx.save(path, {"x": np.ones(1)})
    assert mx.load(path, return_metadata=True)[1] is None


def test_python_numbers_are_stored_as_jax_makes_them(path):
    mx.save(path, {"step": 5, "lr": 0.5, "flag": True})
    back = mx.load(path)
    assert (back["step"].dtype, back["lr"].dtype, back["flag"].dtype) == (
        jnp.int32,
        jnp.float32,
        jnp.bool_,
    )
    assert int(back["step"]) == 5


leaf_arrays = st.builds(
    _random,
    st.sampled_from(DTYPES),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
    st.integers(0, 2**32 - 1),
)
trees = st.recursive(
    leaf_arrays,
    lambda children: st.one_of(
        st.dictionaries(
            # Any text a file's UTF-8 names hold: lone surrogates are refused (tested above).
            st.text(
                st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
                min_size=1,
                max_size=4,
            ),
            children,
            max_size=3,
        ),
        st.lists(children, max_size=3),
        st.builds(Pair, children, children),
    ),
    max_leaves=8,
).filter(lambda t: not isinstance(t, np.ndarray | np.generic))


@settings(max_examples=40, deadline=None)
@given(tree=trees)
def test_random_trees_round_trip(tmp_path_factory, tree):
    path = str(tmp_path_factory.mktemp("h") / "t.safetensors")
    mx.save(path, tree)
    _same(mx.load(path, like=tree), tree)
    assert [_bits(x) for x in jax.tree.leaves(mx.load(path))] == [
        _bits(x) for x in jax.tree.leaves(tree)
    ]


# --- like= ------------------------------------------------------------------------------------


def test_like_a_model_its_transform_or_an_abstract_tree(path):
    model = mx.Sequential(mx.Dense(3, 4), mx.BatchNorm(4))
    init_fn, _ = transformed = mx.transform(model)
    variables = init_fn(jax.random.key(0))
    mx.save(path, variables)
    for like in (model, transformed, jax.eval_shape(init_fn, jax.random.key(0)), variables):
        _same(mx.load(path, like=like), variables)


def test_like_mismatch_lists_every_path_in_one_error(path):
    mx.save(
        path,
        {
            "params": {
                "a": np.ones((2, 3), np.float32),
                "b": np.ones(2, np.float32),
                "c": np.ones(1, np.int8),
            }
        },
    )
    like = {
        "params": {
            "a": jax.ShapeDtypeStruct((3, 2), jnp.float32),
            "c": np.ones(1, np.int32),
            "d": np.ones(1),
        }
    }
    with pytest.raises(mx.errors.CheckpointError) as e:
        mx.load(path, like=like)
    text = str(e.value)
    assert path in text and "at 4 path(s)" in text
    assert "missing from the file: params/d" in text
    assert "not in like: params/b" in text
    assert "params/a: like has float32[3, 2], the file float32[2, 3]" in text
    assert "params/c: like has int32[1], the file int8[1]" in text


def test_like_with_shardings_places_each_array_on_its_devices(tmp_path):
    """Eight CPU devices exist only in a fresh process (XLA reads the flag once)."""
    code = textwrap.dedent(
        f"""
        import jax, numpy as np, metoryx as mx
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((4, 2), ("data", "model"))
        grid = P("data", "model")
        path = {str(tmp_path / "s.safetensors")!r}
        kernel = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
        mx.save(path, {{"kernel": kernel, "bias": np.ones(8, np.float32)}})
        like = {{
            "kernel": jax.ShapeDtypeStruct((64, 8), np.float32, sharding=NamedSharding(mesh, grid)),
            "bias": jax.ShapeDtypeStruct((8,), np.float32, sharding=NamedSharding(mesh, P())),
        }}
        back = mx.load(path, like=like)
        assert back["kernel"].sharding == like["kernel"].sharding
        assert len(back["kernel"].addressable_shards) == 8
        for shard in back["kernel"].addressable_shards:
            assert shard.data.shape == (16, 4)
            np.testing.assert_array_equal(np.asarray(shard.data), kernel[shard.index])
        assert back["bias"].sharding.is_fully_replicated
        print("ok")
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr


# --- atomic writes ----------------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(path, monkeypatch):
    old = {"x": np.arange(4, dtype=np.float32)}
    mx.save(path, old)
    real = safetensors.numpy.save_file

    def fail_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        with open(filename, "r+b") as f:  # half the new file on disk, then the "crash"
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_midway)
    with pytest.raises(OSError, match="No space"):
        mx.save(path, {"x": np.zeros(1000, np.float32)})
    _same(mx.load(path), old)
    assert os.listdir(os.path.dirname(path)) == ["ckpt.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="dead writers are found by process id")
def test_save_removes_the_scratch_of_dead_writers_only(path):
    directory = os.path.dirname(path)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host, dead = socket.gethostname(), int(finished.stdout)
    kept = [
        f".ckpt.safetensors.{host}-{os.getpid()}.0a1b2c.tmp",  # a running writer (this one)
        f".ckpt.safetensors.other-host-{dead}.0a1b2c.tmp",  # may be running elsewhere
        f".other.safetensors.{host}-{dead}.0a1b2c.tmp",  # another target's
        f".ckpt.safetensors.{host}-notapid.0a1b2c.tmp",  # not a writer's name
    ]
    removed = [
        f".ckpt.safetensors.{host}-{dead}.0a1b2c.tmp",
        f".ckpt.safetensors.{host}-{2**80}.ff.tmp",
    ]
    for name in kept + removed:
        os.mkdir(os.path.join(directory, name))
        with open(os.path.join(directory, name, ".tmpXyZ"), "wb") as f:  # safetensors' own
            f.write(b"half a file")
    mx.save(path, {"x": np.ones(3, np.float32)})
    assert sorted(os.listdir(directory)) == sorted([*kept, "ckpt.safetensors"])
    _same(mx.load(path), {"x": np.ones(3, np.float32)})


def test_save_replaces_the_file_with_the_usual_permissions(path):
    mx.save(path, {"x": np.ones(1)})
    mx.save(path, {"y": np.ones(2)})
    assert list(mx.load(path)) == ["y"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# --- damaged and foreign files ----------------------------------------------------------------


def _written(path):
    mx.save(path, {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.int8)})
    with open(path, "rb") as f:
        return bytearray(f.read())


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_a_flipped_byte_is_caught_and_verify_false_skips_the_check(path):
    data = _written(path)
    data[-100] ^= 0x01
    _write(path, data)
    with pytest.raises(mx.errors.CheckpointError, match=r"checksum of w differs"):
        mx.load(path)
    back = mx.load(path, verify=False)
    assert back["w"].shape == (1000,) and back["w"].dtype == jnp.float32


@pytest.mark.parametrize("keep", [0, 4, 8, 50, -1, -4000])
def test_truncated_files_raise(path, keep):
    data = _written(path)
    _write(path, data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(mx.errors.CheckpointError, match="not a readable checkpoint") as e:
        mx.load(path)
    assert path in str(e.value)


def test_a_file_that_is_not_safetensors_raises(path):
    _write(path, b"PK\x03\x04" + bytes(200))  # a zip (np.savez) file
    with pytest.raises(mx.errors.CheckpointError, match="safetensors cannot read it"):
        mx.load(path)


def test_a_safetensors_file_of_another_writer_is_refused_with_advice(path):
    safetensors.numpy.save_file(
        {"bert.pooler.dense.weight": np.ones((2, 2), np.float32)}, path, {"format": "pt"}
    )
    with pytest.raises(mx.errors.CheckpointError, match="not one written by mx.save") as e:
        mx.load(path)
    assert "safetensors.numpy.load_file" in str(e.value) and "load_state_dict" in str(e.value)


def _edit_header(path, edit):
    """Rewrite the JSON header of `path` through `edit(header) -> header`, keeping the data."""
    data = _written(path)
    n = int.from_bytes(data[:8], "little")
    header = edit(json.loads(data[8 : 8 + n]))
    text = json.dumps(header).encode()
    _write(path, len(text).to_bytes(8, "little") + text + data[8 + n :])


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: {**h, "w": {**h["w"], "data_offsets": [0, 10**9]}},  # past the end
        lambda h: {**h, "w": {**h["w"], "dtype": "F64"}},  # wrong dtype size
        lambda h: {**h, "w": {**h["w"], "shape": [999]}},
        lambda h: {**h, "__metadata__": {**h["__metadata__"], "metoryx.tree": "{"}},
        lambda h: {**h, "__metadata__": {**h["__metadata__"], "metoryx.tree": '{"kind": "dict"}'}},
        lambda h: {
            **h,
            "__metadata__": {
                **h["__metadata__"],
                "metoryx.tree": json.dumps(
                    {"kind": "dict", "keys": ["w"], "items": [{"kind": "array"}]}
                ),
            },
        },  # b not named
        lambda h: {**h, "__metadata__": {**h["__metadata__"], "metoryx.crc32c": "[]"}},
        lambda h: {
            **h,
            "__metadata__": {
                **h["__metadata__"],
                "metoryx.tree": json.dumps(
                    {
                        "kind": "dict",
                        "keys": ["w", "b"],
                        "items": [{"kind": "key", "impl": "nope"}, {"kind": "array"}],
                    }
                ),
            },
        },
    ],
    ids=["offsets", "dtype", "shape", "tree-json", "tree-items", "tree-names", "crc", "key-impl"],
)
def test_a_lying_header_raises(path, edit):
    _edit_header(path, edit)
    with pytest.raises(mx.errors.CheckpointError, match="not a readable checkpoint"):
        mx.load(path)


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        mx.load(str(tmp_path / "none.safetensors"))


# --- refused at save time ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ({"a/b": np.ones(1)}, "holding '/'"),
        ({"a": {"": np.ones(1)}}, "empty key"),
        ({(1, 2): np.ones(1)}, "a tuple key"),
        ({1: np.ones(1), "1": np.ones(1)}, r"two keys give the tensor name part\(s\) \['1'\]"),
        ({"s": "text"}, "the leaf at s is a str, not an array"),
        ({"c": np.ones(2, np.complex128)}, "complex128, which safetensors cannot store"),
        ({"i": jnp.ones(2, jnp.int4)}, "int4, which safetensors cannot store"),
        (np.ones(3), "a lone ndarray"),
        ({"\ud800": np.ones(1)}, "UTF-8 cannot encode"),
    ],
    ids=[
        "slash",
        "empty",
        "tuple-key",
        "twins",
        "str-leaf",
        "complex128",
        "int4",
        "lone",
        "surrogate",
    ],
)
def test_trees_that_a_file_cannot_hold_are_refused(path, tree, match):
    with pytest.raises(mx.errors.CheckpointError, match=match):
        mx.save(path, tree)
    assert not os.path.exists(path)


def test_metadata_must_be_json(path):
    with pytest.raises(mx.errors.CheckpointError, match="metadata must be JSON"):
        mx.save(path, {"x": np.ones(1)}, metadata={"f": np.ones(1)})


# --- memory -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_loading_200_mb_keeps_one_copy_in_memory(tmp_path):
    """Peak resident memory of a fresh process loading a 200 MB file, above its baseline."""
    path = str(tmp_path / "big.safetensors")
    mx.save(path, {f"w{i}": np.full(25_000_000 // 4 * 2, i, np.float32) for i in range(4)})
    code = textwrap.dedent(
        f"""
        import jax, metoryx as mx
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        jax.device_put(1.0).block_until_ready()  # the runtime's own memory in the baseline
        base = hwm()
        tree = mx.load({path!r})
        jax.block_until_ready(tree)
        print(hwm() - base)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    data = 200_000_000
    assert int(result.stdout) < 1.3 * data, f"peak {int(result.stdout) / data:.2f}x the data"


def test_without_safetensors_the_error_says_how_to_install_it(path, monkeypatch):
    for name in ("safetensors", "safetensors.numpy"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"mx.save .*pip install 'metoryx\[checkpoints\]'"):
        mx.save(path, {"x": np.ones(1)})
    advice = r"load_state_dict .*pip install 'metoryx\[checkpoints\]'"
    with pytest.raises(ImportError, match=advice):
        mx.interop.torch.load_state_dict(mx.Dense(1, 1), path)


def test_without_crc32c_the_error_says_how_to_install_it(path, monkeypatch):
    mx.save(path, {"x": np.ones(1)})
    monkeypatch.setitem(sys.modules, "crc32c", None)
    with pytest.raises(ImportError, match=r"CRC-32C .*pip install 'metoryx\[checkpoints\]'"):
        mx.save(path, {"x": np.ones(1)})
    with pytest.raises(ImportError, match="crc32c"):
        mx.load(path)
    assert mx.load(path, verify=False)["x"].tolist() == [1.0]  # no checksum, no package needed
