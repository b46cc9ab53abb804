"""mx.save and mx.load under stress: random trees come back bit-exactly, a writer killed at any
moment leaves a checkpoint that loads, and a damaged file raises CheckpointError, never a crash
or wrong arrays.

The crash and fuzz loops run in child processes: a kill must hit a real writer, and a segfault
must fail a test rather than end pytest. The children import this file for their code."""

import dataclasses
import itertools
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metoryx as mx

TESTS = str(Path(__file__).parent)


def _child(call: str, *args: str) -> list[str]:
    """The command line of a Python child that runs ``call`` of this file."""
    code = f"import sys; sys.path.insert(0, {TESTS!r}); import test_saving_robustness as t; {call}"
    return [sys.executable, "-c", code, *args]


def _bits(leaf) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and bytes: equal only for bit-identical arrays (NaN payloads included); a
    typed key by its dtype (which names its impl) and its key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return str(leaf.dtype), leaf.shape, np.asarray(jax.random.key_data(leaf)).tobytes()
    array = np.asarray(leaf)
    return str(array.dtype), array.shape, array.tobytes()


def _leaves(tree) -> tuple[object, list[tuple[str, tuple[int, ...], bytes]]]:
    flat, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [_bits(leaf) for leaf in flat]


# ----------------------------------------------------------------------------------------------
# Random trees.


class Pair(NamedTuple):
    first: Any
    second: Any


class AdamLike(NamedTuple):
    count: Any
    mu: Any
    nu: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Scaled:
    value: Any
    scale: Any


DTYPES = [
    ml_dtypes.bfloat16, np.float16, np.float32, np.float64, np.bool_, np.int8, np.int16,
    np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.complex64,
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
]  # fmt: skip


def _special_bits(dtype: np.dtype) -> list[int]:
    """Bit patterns that a cast or a canonicalization would change: NaNs with payloads (quiet
    and signalling, either sign), infinities, -0.0, the smallest subnormal."""
    bits = 8 * dtype.itemsize
    sign, top = 1 << (bits - 1), (1 << bits) - 1
    if (
        dtype.kind != "f"
        and dtype not in (np.dtype(ml_dtypes.bfloat16),)
        and "float8" not in dtype.name
    ):
        return [0, 1, sign, top]
    info = ml_dtypes.finfo(dtype)
    exponent = ((1 << info.nexp) - 1) << info.nmant
    quiet = 1 << (info.nmant - 1)
    return [exponent | 1, exponent | quiet | 5 % quiet, sign | exponent | 2, exponent, sign, 1]


@st.composite
def _arrays(draw) -> Any:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    unit = np.dtype(np.float32) if dtype == np.complex64 else dtype  # complex: two float32s
    count = math.prod(shape) * dtype.itemsize // unit.itemsize
    if unit == np.bool_:
        patterns = st.integers(0, 1)
    else:
        patterns = st.integers(0, (1 << 8 * unit.itemsize) - 1) | st.sampled_from(
            _special_bits(unit)
        )
    bits = np.array(draw(st.lists(patterns, min_size=count, max_size=count)), f"u{unit.itemsize}")
    array = bits.view(unit).view(dtype).reshape(shape)
    # A jax.Array too, where JAX keeps the dtype (64 bits only under jax_enable_x64).
    if jax.dtypes.canonicalize_dtype(dtype) == dtype and draw(st.booleans()):
        return jnp.asarray(array)
    return array


_keys = st.text(
    st.characters(exclude_characters="/", exclude_categories=["Cs"]), min_size=1, max_size=6
) | st.sampled_from([".", "..", "a.b", "layer.0", "0", " ", "__metadata"])


def _chain(keys_and_leaf: tuple[list[str], Any]) -> Any:
    keys, leaf = keys_and_leaf
    for key in reversed(keys):
        leaf = {key: leaf}
    return leaf


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.dictionaries(_keys, children, max_size=4),
        st.dictionaries(st.integers(0, 99), children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Pair, children, children),
        st.builds(AdamLike, children, children, children),
        st.builds(Scaled, children, children),
        st.tuples(st.lists(_keys, min_size=8, max_size=16), children).map(_chain),  # deep paths
    )


_trees = _containers(
    st.recursive(
        _arrays() | st.none() | st.builds(jax.random.key, st.integers(0, 9)),
        _containers,
        max_leaves=12,
    )
)


def _as_saved(node: Any) -> Any:
    """What mx.load gives back without like=: NamedTuples and dataclasses as dicts by field."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return {field: _as_saved(child) for field, child in zip(node._fields, node, strict=True)}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: _as_saved(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        return {key: _as_saved(child) for key, child in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_as_saved(child) for child in node)
    return node


def _assert_same(got: Any, want: Any, ordered: bool, path: str = "") -> None:
    """Same containers (types, keys, in order if ``ordered``: through like= JAX rebuilds dicts
    with sorted keys), bit-identical leaves of the documented types."""
    if want is None:
        assert got is None, path
        return
    if isinstance(want, dict | list | tuple) or dataclasses.is_dataclass(want):
        assert type(got) is type(want), (path, type(got), type(want))
        if isinstance(want, dict):
            assert list(got) == list(want) if ordered else set(got) == set(want), path
            pairs = [(str(k), got[k], want[k]) for k in want]
        elif dataclasses.is_dataclass(want):
            pairs = [
                (f.name, getattr(got, f.name), getattr(want, f.name))
                for f in dataclasses.fields(want)
            ]
        else:
            assert len(got) == len(want), path
            pairs = [(str(i), g, w) for i, (g, w) in enumerate(zip(got, want, strict=True))]
        for key, g, w in pairs:
            _assert_same(g, w, ordered, f"{path}/{key}")
        return
    assert _bits(got) == _bits(want), path
    # A jax.Array, except 64-bit leaves while jax_enable_x64 is off (JAX would cast them).
    key = jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key)
    x64 = not key and jax.dtypes.canonicalize_dtype(want.dtype) != want.dtype
    assert isinstance(got, np.ndarray if x64 else jax.Array), (path, type(got))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees)
def test_random_trees_round_trip_bit_exactly(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("tree") / "tree.safetensors"
    mx.save(path, tree)
    _assert_same(mx.load(path, like=tree), tree, ordered=False)
    _assert_same(mx.load(path), _as_saved(tree), ordered=True)
    _assert_same(mx.load(path, verify=False), _as_saved(tree), ordered=True)


def test_an_array_named_like_the_safetensors_metadata_is_refused_before_writing(tmp_path):
    path = tmp_path / "state.safetensors"
    mx.save(path, {"w": np.ones(2, np.float32)})
    with pytest.raises(mx.errors.CheckpointError, match="'__metadata__'"):
        mx.save(path, {"__metadata__": np.zeros(2, np.float32)})
    # Nested, the name is params/__metadata__: no clash.
    mx.save(path, {"params": {"__metadata__": np.zeros(2, np.float32)}})
    assert mx.load(path)["params"]["__metadata__"].shape == (2,)


# ----------------------------------------------------------------------------------------------
# A writer killed at random moments.

CRASH_ROUNDS = 24
CRASH_SEED = 20240613


def _version_tree(version: int) -> dict:
    # Every byte depends on the version, so a file torn between two versions passes for neither.
    return {
        "params": {
            "w": np.full((6_000_000,), version, np.float32),
            "b": np.full((2_000_000,), version % 256, ml_dtypes.bfloat16),
        },
        "step": np.asarray(version, np.int32),
    }


def _held_version(path: Path) -> int:
    """The version that ``path`` holds, after checking that every byte is that version's."""
    loaded = mx.load(path)
    version = int(np.asarray(loaded["step"]))
    assert _leaves(loaded) == _leaves(_version_tree(version)), f"version {version} is torn"
    return version


def crash_server(target: str) -> None:
    """Child: on each ``go VERSION`` line, fork a writer that saves VERSION, VERSION + 1, ...
    over ``target`` until it is killed, and report its pid and its end.

    Forking from a process that imported metoryx once makes a round cost a kill, not an import.
    """

    def say(line: str) -> None:
        os.write(1, (line + "\n").encode())

    say("ready")
    for command in sys.stdin:
        first = int(command.split()[1])
        pid = os.fork()
        if pid == 0:
            for version in itertools.count(first):
                tree = _version_tree(version)
                say(f"begin {version}")
                mx.save(target, tree)
                say(f"saved {version}")
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"dead {status}")


class _Server:
    def __init__(self, target: Path):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            _child("t.crash_server(sys.argv[1])", str(target)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.read() == "ready"

    def read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the crash server ended with {self.process.wait()}"
        return line.strip()

    def start(self, first: int) -> tuple[int, list[str]]:
        """Start a writer; return its pid and the lines read until it began to save."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"go {first}\n")
        self.process.stdin.flush()
        pid, lines = None, []
        while pid is None or not any(line.startswith("begin") for line in lines):
            line = self.read()
            if line.startswith("pid"):
                pid = int(line.split()[1])
            else:
                lines.append(line)
        return pid, lines

    def finish(self) -> list[str]:
        """The writer's lines until the server saw it die."""
        lines = []
        while not (line := self.read()).startswith("dead"):
            lines.append(line)
        return lines

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


def _last_saved(lines: list[str], default: int) -> int:
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
    return saved[-1] if saved else default


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path):
    target = tmp_path / "state.safetensors"
    mx.save(target, _version_tree(0))
    server = _Server(target)
    rng = random.Random(CRASH_SEED)
    held, changed, left = 0, [], []
    try:
        # The first round times a save: two whole saves, then the kill.
        pid, lines = server.start(held + 1)
        began = time.perf_counter()
        while f"saved {held + 2}" not in lines:
            lines.append(server.read())
        save_seconds = (time.perf_counter() - began) / 2
        os.kill(pid, signal.SIGKILL)
        # The other kills, one in each slice of two saves' time (the second save's start lands
        # the kill before, within or after the first's rename), at a random point of it.
        delays = [2 * save_seconds * (k + rng.random()) / CRASH_ROUNDS for k in range(CRASH_ROUNDS)]
        rng.shuffle(delays)
        for delay in [None, *delays]:
            if delay is not None:
                pid, lines = server.start(held + 1)
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
            lines += server.finish()
            last = _last_saved(lines, default=held)
            version = _held_version(target)
            # The last version reported saved is there, or the one after it: killed between
            # its rename and its report.
            assert version in (last, last + 1), (version, last, lines)
            changed.append(version != held)
            held = version
            # A kill inside a write leaves its scratch directory, hidden beside the target (no
            # reader takes it for a checkpoint); each save first removes those of dead writers,
            # so there is never more than the last killed writer's.
            scratch = [p.name for p in tmp_path.iterdir() if p != target]
            assert len(scratch) <= 1, scratch
            assert all(name.startswith(".state.safetensors.") for name in scratch), scratch
            left.append(bool(scratch))
    finally:
        server.close()
    assert len(changed) == CRASH_ROUNDS + 1
    assert any(changed) and not all(changed), changed  # kills before and after a rename
    assert any(left), "no kill landed inside a write"
    assert list(tmp_path.glob("*.safetensors")) == [target]
    mx.save(target, _version_tree(held + 1))
    assert _held_version(target) == held + 1
    assert list(tmp_path.iterdir()) == [target]


# ----------------------------------------------------------------------------------------------
# Damaged files.

FUZZ_CASES = 1200
FUZZ_SEED = 13


def _small_tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "dense": {
                "kernel": rng.standard_normal((3, 4), np.float32),
                "bias": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
            },
            "layer.norm": {"scale": rng.standard_normal((4,), np.float32)},
            "blocks": [
                {"w": rng.integers(-100, 100, (2, 2), np.int8)},
                {"w": rng.integers(0, 1000, (2, 3), np.uint16)},
            ],
        },
        "state": {"mask": rng.integers(0, 2, (5,)).astype(bool), "empty": np.zeros((0, 3))},
        "step": np.asarray(7, np.int32),
        "key": jax.random.key(3),
    }


SAFETENSORS_DTYPES = [
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
]


def _split(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _odd_value(rng: random.Random) -> object:
    return rng.choice(
        [-1, 0, 2**64, 10**30, 1.5, "7", None, [], {}, True, "x" * 10_000, [2**63, 2**63]]
    )


def _edit_tensor(entry: dict, rng: random.Random, body_size: int) -> None:
    field = rng.choice(["dtype", "shape", "data_offsets", "remove"])
    if field == "dtype":
        entry["dtype"] = rng.choice([*SAFETENSORS_DTYPES, "F33", "", 5])
    elif field == "shape":
        shape = list(entry["shape"])
        edit = rng.choice(["grow", "shrink", "add", "drop", "reverse", "odd"])
        if edit in ("grow", "shrink") and shape:
            i = rng.randrange(len(shape))
            shape[i] = max(shape[i] + (1 if edit == "grow" else -1), 0)
        elif edit == "add":
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 2**40]))
        elif edit == "drop" and shape:
            shape.pop(rng.randrange(len(shape)))
        elif edit == "reverse":
            shape.reverse()
        else:
            shape = _odd_value(rng)
        entry["shape"] = shape
    elif field == "data_offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [
                [start + 1, end + 1],
                [start - 1, end - 1],
                [start, end + 1],
                [end, start],
                [start, body_size + rng.randrange(1, 2**40)],
                [0, end - start],
                [start],
                _odd_value(rng),
            ]
        )
    else:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]


def _edit_header(header: dict, rng: random.Random, body_size: int) -> object:
    names = [name for name in header if name != "__metadata__"]
    metadata = header.get("__metadata__", {})
    edit = rng.choice(["tensor", "tensor", "remove", "rename", "metadata", "whole", "add"])
    if edit == "tensor":
        _edit_tensor(header[rng.choice(names)], rng, body_size)
    elif edit == "remove":
        del header[rng.choice([*names, "__metadata__"])]
    elif edit == "rename":
        header[rng.choice(names) + rng.choice(["x", "/x", ".x"])] = header.pop(rng.choice(names))
    elif edit == "metadata" and metadata:
        key = rng.choice(sorted(metadata))
        change = rng.choice(["remove", "garbage", "odd", "cut"])
        if change == "remove":
            del metadata[key]
        elif change == "garbage":
            metadata[key] = rng.randbytes(rng.randrange(1, 40)).decode("latin-1")
        elif change == "odd":
            metadata[key] = _odd_value(rng)
        else:
            metadata[key] = metadata[key][: rng.randrange(len(metadata[key]) + 1)]
    elif edit == "whole":
        return _odd_value(rng)
    else:
        header[rng.choice(["extra", "params/extra", "step/x"])] = dict(header[rng.choice(names)])
    return header


def _damaged(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One damaged copy of a checkpoint file, and the kind of damage."""
    (size,) = struct.unpack("<Q", data[:8])
    kind = rng.choice(["header flip", "data flip", "truncation", "header edit", "length"])
    if kind in ("header flip", "data flip"):
        at = (
            rng.randrange(8 + size) if kind == "header flip" else rng.randrange(8 + size, len(data))
        )
        flipped = bytearray(data)
        flipped[at] ^= rng.randrange(1, 256)
        return kind, bytes(flipped)
    if kind == "truncation":
        return kind, data[: rng.randrange(len(data))]
    if kind == "length":
        size = rng.choice([len(data), len(data) * 2, 2**63, 2**64 - 1, 0, size - 8, size + 8])
        return kind, struct.pack("<Q", size) + data[8:]
    header, body = _split(data)
    return kind, _join(_edit_header(header, rng, len(body)), body)


def _outcome(path: Path, like: object, verify: bool, want: tuple[object, list]) -> str:
    """What loading a damaged file gave: "raised", "same", "other data" (only without
    verification) or "BROKEN ..." for a broken promise."""
    try:
        got = _leaves(mx.load(path, like=like, verify=verify))
    except mx.errors.CheckpointError:
        return "raised"
    except Exception as e:  # any other exception is a broken promise
        return f"BROKEN {type(e).__name__}: {e}"
    if got == want:
        return "same"
    fits = got[0] == want[0] and [g[:2] for g in got[1]] == [w[:2] for w in want[1]]
    if fits and not verify:
        return "other data"  # what the skipped checksum would have caught
    return "BROKEN wrong arrays" if not fits else "BROKEN other data despite verify"


def fuzz(directory: str, seed: int, cases: int) -> None:
    """Child: load ``cases`` damaged copies of a small checkpoint (with and without ``like``
    and verification) and print a JSON report: outcome counts by damage, and broken promises."""
    original = _small_tree()
    source, bad = Path(directory) / "small.safetensors", Path(directory) / "bad.safetensors"
    mx.save(source, original)
    data, want = source.read_bytes(), _leaves(original)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    broken: list[str] = []
    for case in range(cases):
        kind, damaged = _damaged(data, rng)
        bad.write_bytes(damaged)
        for like, verify in itertools.product((None, original), (True, False)):
            label = f"{kind} like={like is not None} verify={verify}"
            os.write(2, f"case {case}: {label}\n".encode())  # the last line names a crash
            outcome = _outcome(bad, like, verify, want)
            if outcome.startswith("BROKEN"):
                broken.append(f"case {case}: {label}: {outcome}")
                outcome = "broken"
            counts[f"{label}: {outcome}"] = counts.get(f"{label}: {outcome}", 0) + 1
    print(json.dumps({"counts": counts, "broken": broken}))


def test_damaged_files_raise_checkpoint_error_never_crash_or_wrong_arrays(tmp_path):
    call = "t.fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    args = (str(tmp_path), str(FUZZ_SEED), str(FUZZ_CASES))
    done = subprocess.run(_child(call, *args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"the loader died ({done.returncode}) after:\n{done.stderr[-2000:]}"
    )
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["broken"] == [], "\n".join(report["broken"][:30])
    counts = report["counts"]
    assert sum(counts.values()) == 4 * FUZZ_CASES
    flips = {k: v for k, v in counts.items() if k.startswith("data flip")}
    # Every changed byte of tensor data is caught by the checksum; skipped, such a file loads.
    n = flips["data flip like=False verify=True: raised"]
    assert n > 100
    assert flips == {
        f"data flip like={like} verify={verify}: {'raised' if verify else 'other data'}": n
        for like, verify in itertools.product((False, True), (True, False))
    }
