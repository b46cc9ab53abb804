"""Checkpoint files: ``mx.save`` and ``mx.load``.

A checkpoint is one safetensors file. Each array of the tree is a tensor named by its
``/``-joined path (``params/encoder/fc/kernel``, ``opt_state/0/mu/fc/bias``), so any safetensors
reader opens it. The header's ``__metadata__`` (a str -> str map) holds, as JSON, what a flat
list of tensors cannot say: the tree's structure (node kinds, key order, empty containers,
NamedTuple field names, typed PRNG keys), a CRC-32C of every tensor, and the user's metadata.
Nothing is pickled, so loading a file never runs code.

Writes are atomic (a file in a scratch directory beside the target, flushed to disk, renamed
over the target): a crash at any moment leaves the old file or the new one. Reads check every
tensor's checksum by default and read each tensor once, into the buffer the returned array keeps.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from metoryx import errors
from metoryx._core.info import VariableInfo, variable_info
from metoryx._core.module import Module
from metoryx._core.paths import Path, key_str, path_str
from metoryx._core.transform import Transformed

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["load", "save"]

# The keys of the header's __metadata__ that mx.save writes; their values are JSON text.
_FORMAT, _TREE, _CRC32C, _USER = (
    "metoryx.format",
    "metoryx.tree",
    "metoryx.crc32c",
    "metoryx.metadata",
)
_VERSION = "1"
_ALIGN = 64
_PIECE = 1 << 20  # the bytes read and checksummed at a time: a slice of a CPU's L2/L3 cache
_MAPPED = 1 << 20  # tensors from this size on are read into their own populated mapping


def save(
    path: str | os.PathLike[str], tree: Any, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write a tree of arrays to ``path`` as a safetensors file, atomically.

    ``tree`` is any PyTree of arrays whose nodes are dicts, lists, tuples, NamedTuples, ``None``
    or other registered nodes (``jax.tree_util.register_dataclass`` classes): a model's
    ``variables``, or a whole training state such as ``{"variables": ..., "opt_state": ...,
    "step": ..., "key": ...}`` with an optax state in it. Its leaves are ``jax.Array`` or NumPy
    arrays of any dtype safetensors has a code for (every float, int and uint width, ``bool``,
    ``bfloat16``, ``complex64``, the float8 types ``float8_e4m3fn``/``e5m2`` and their ``fnuz``
    variants), Python numbers (stored as the 0-d array ``jnp.asarray`` makes of them) and typed
    keys from ``jax.random.key`` (their key data is stored with the name of the PRNG impl). A
    sharded ``jax.Array`` is gathered to host memory to be written.

    Each tensor is named by its path, the keys from the root joined by ``/`` (dict keys as
    written, list and tuple indices as decimals, NamedTuple and dataclass fields by name); a
    dot in a key is kept (``"layer.0"``). The file is written in a scratch directory beside
    ``path``, flushed to disk and renamed over ``path``: a crash at any moment leaves the old
    file or the new one, never a torn one. A save also removes the scratch directories that
    writers of ``path`` on this host left when they were killed.

    Args:
        path: the file to write (by convention ``*.safetensors``); its directory must exist.
        tree: the arrays, in nested containers.
        metadata: JSON-serializable data to keep beside the arrays (a config, the step, a
            metric); :func:`load` returns it with ``return_metadata=True``.

    Raises:
        CheckpointError: a path part that is empty, holds ``/``, is not a str or int, or
            equals a sibling's (``1`` and ``"1"``); a leaf that is not an array; a dtype
            safetensors cannot store (``complex128``, ``int4``); a lone array as the tree;
            metadata that is not JSON.
        ImportError: when the ``safetensors`` package is not installed.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, metoryx as mx
        >>> variables = mx.transform(mx.Dense(3, 2)).init(jax.random.key(0))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> mx.save(path, variables, metadata={"epoch": 3})
        >>> import safetensors.numpy
        >>> sorted(safetensors.numpy.load_file(path))
        ['params/bias', 'params/kernel']
    """
    safetensors = import_safetensors("mx.save")
    target = os.fspath(path)
    if _is_leaf(tree):
        raise errors.CheckpointError(
            f"mx.save({target!r}, ...) takes a tree of arrays, got a lone "
            f"{type(tree).__name__}: a tensor needs a name. Wrap it: mx.save(path, {{'x': x}})."
        )
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    structure = _encode(tree, (), tensors, target)
    if "__metadata__" in tensors:
        raise errors.CheckpointError(
            f"mx.save({target!r}): the top-level key '__metadata__' holds an array, but "
            f"safetensors keeps that name for the header's metadata, so no reader could open "
            f"the file. Rename the key, or nest the array one level deeper."
        )
    _check_dtypes(safetensors, tensors, target)
    try:
        user = json.dumps(dict(metadata) if metadata is not None else None)
    except (TypeError, ValueError) as e:
        raise errors.CheckpointError(
            f"mx.save({target!r}): metadata must be JSON (str keys; str, numbers, bools, None, "
            f"lists and dicts of them), but {e}. Convert the values first (str(x), float(x))."
        ) from None
    header = {
        _FORMAT: _VERSION,
        _TREE: json.dumps(structure),
        _CRC32C: json.dumps({name: _checksum(array) for name, array in tensors.items()}),
        _USER: user,
    }
    _write_atomically(target, lambda tmp: safetensors.numpy.save_file(tensors, tmp, header))


def load(
    path: str | os.PathLike[str],
    like: Any = None,
    *,
    verify: bool = True,
    return_metadata: bool = False,
) -> Any:
    """Read a file written by :func:`save`.

    Without ``like`` the tree comes back in the containers it was saved with, as far as a file
    can say without running code: dicts as dicts (keys and order as saved), lists as lists,
    tuples as tuples, ``None`` as ``None``, and NamedTuples and other registered nodes as dicts
    keyed by their field names. With ``like`` the leaves are checked against it and come back in
    its very structure (the optax state's own NamedTuple classes, for example). ``like`` is:

    - a tree of the same structure: ``variables``, an optax state, or abstract arrays
      (``jax.eval_shape(init_fn, key)``, ``jax.ShapeDtypeStruct``). A leaf with a
      ``.sharding`` (a sharded ``jax.Array``, a ``ShapeDtypeStruct(..., sharding=...)``) puts
      its array straight onto those devices, each device receiving its part;
    - an ``mx.Module`` or the ``mx.Transformed`` of ``mx.transform``: its variables' tree.

    Every path missing from the file, present only in the file, or of another shape or dtype
    than ``like`` says is named in one error.

    Leaves are ``jax.Array``s on the default device (or ``like``'s shardings) holding the
    saved dtype bit-exactly; typed PRNG keys come back as typed keys of the same impl. A
    64-bit leaf (``float64``, ``int64``, ``uint64``) while ``jax_enable_x64`` is off comes back
    as a NumPy array instead, since a ``jax.Array`` would silently be cast to 32 bits. Each
    tensor is read once into the buffer its array keeps (no second copy in host memory).

    Args:
        path: a file written by :func:`save`.
        like: what to check the file against and to restore into (see above); None for none.
        verify: check every tensor's CRC-32 against the one written (the default). False skips
            it: faster, but a flipped bit then goes unnoticed.
        return_metadata: return ``(tree, metadata)`` with the ``metadata`` given to ``save``.

    Returns:
        The tree, or ``(tree, metadata)`` with ``return_metadata=True``.

    Raises:
        CheckpointError: the file is truncated, corrupted (a checksum or the header is wrong),
            not a safetensors file, or a safetensors file not written by ``mx.save`` (read
            those with ``safetensors.numpy.load_file`` or ``mx.interop.torch``); or it does not
            fit ``like``.
        FileNotFoundError: when there is no file at ``path``.
        ImportError: when the ``safetensors`` package is not installed.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, optax, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(3, 2))
        >>> variables = init_fn(jax.random.key(0))
        >>> state = {"variables": variables, "opt": optax.adam(1e-3).init(variables["params"]),
        ...          "step": 10, "key": jax.random.key(1)}
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> mx.save(path, state, metadata={"lr": 1e-3})
        >>> back, meta = mx.load(path, like=state, return_metadata=True)
        >>> type(back["opt"][0]).__name__, int(back["step"]), meta
        ('ScaleByAdamState', 10, {'lr': 0.001})
        >>> mx.load(path)["opt"][0]["mu"]["kernel"].shape  # no like: fields as dict keys
        (3, 2)
        >>> mx.save(path, variables)
        >>> abstract = jax.eval_shape(init_fn, jax.random.key(0))  # shapes alone, no arrays
        >>> restored = mx.load(path, like=abstract)
        >>> bool((restored["params"]["kernel"] == variables["params"]["kernel"]).all())
        True
    """
    safetensors = import_safetensors("mx.load")
    source = os.fspath(path)
    with open(source, "rb") as file:
        tensors, meta = _read_header(safetensors, file, source)
        structure, crcs, user = _decode_header(meta, source)
        leaves = _leaves(structure, (), source)
        _check_names(leaves, tensors, crcs, source)
        read = _Reader(file, source, tensors, crcs, verify)
        if like is None:
            tree = _build(structure, (), read, source)
        else:
            tree = _load_like(like, leaves, read, source)
    return (tree, user) if return_metadata else tree


class _Tensor(NamedTuple):
    """A tensor as the file's header describes it."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    start: int  # from the start of the file
    nbytes: int


class _Leaf(NamedTuple):
    """A leaf of the saved tree: its path, the impl name for a typed PRNG key, and the dtype
    name and shape it was saved with. The CRC-32 covers the bytes alone: a header that calls
    float32 bytes int32, or a (3, 4) tensor (4, 3), is caught by these (with verify=False too).
    """

    path: Path
    impl: str | None
    dtype: str
    shape: tuple[int, ...]


def import_safetensors(caller: str) -> ModuleType:
    """The ``safetensors`` package (with ``safetensors.numpy``), or an ImportError saying how
    to install it; ``caller`` names what needs it. Shared with ``metoryx.interop``."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:
        raise ImportError(
            f"{caller} writes and reads safetensors files and needs the 'safetensors' package. "
            f"Install it: pip install 'metoryx[checkpoints]' (or pip install safetensors)."
        ) from e
    return safetensors


def _crc32c() -> Callable[[Any, int], int]:
    try:
        from crc32c import crc32c
    except ImportError as e:
        raise ImportError(
            "mx.save and mx.load checksum every tensor with CRC-32C and need the 'crc32c' "
            "package. Install it: pip install 'metoryx[checkpoints]' (or pip install crc32c)."
        ) from e
    return crc32c


# --- save -------------------------------------------------------------------------------------


def _is_leaf(node: Any) -> bool:
    return isinstance(node, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def _part(key: Any, path: Path, target: str) -> str:
    """The path part of a container key, refused when a path could not hold it."""
    part = None if isinstance(key, bool) else key_str(key)
    unencodable = part is not None and not part.isascii() and not _utf8(part)
    if part is None or not part or "/" in part or unencodable:
        what = (
            f"a {type(key).__name__} key"
            if part is None
            else "an empty key"
            if not part
            else "a key holding '/', which joins path parts"
            if "/" in part
            else "a str that UTF-8 cannot encode (a lone surrogate), as the file's names are"
        )
        raise errors.CheckpointError(
            f"mx.save({target!r}): the key {key!r} under {path_str(path)} is {what}; tensor "
            f"names are the str (or int) keys joined by '/'. Rename the key (a non-empty str "
            f"without '/'), or convert the tree before saving."
        )
    return part


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encode(node: Any, path: Path, tensors: dict[str, np.ndarray[Any, Any]], target: str) -> Any:
    """The JSON record of ``node``'s structure; its arrays go to ``tensors`` by path name."""
    if node is None:
        return {"kind": "none"}
    if _is_leaf(node):
        return _encode_leaf(node, path, tensors)
    if isinstance(node, Mapping):
        keys: list[Any] = list(node)
        children = [(_part(k, path, target), node[k]) for k in keys]
        record: dict[str, Any] = {"kind": "dict", "keys": keys}
    elif isinstance(node, tuple) and hasattr(type(node), "_fields"):  # a NamedTuple
        fields: list[str] = list(type(node)._fields)  # pyright: ignore[reportAttributeAccessIssue]
        children = list(zip(fields, node, strict=True))
        record = {"kind": "namedtuple", "name": type(node).__name__, "keys": fields}
    elif isinstance(node, list | tuple):
        children = [(str(i), child) for i, child in enumerate(node)]
        record = {"kind": "list" if isinstance(node, list) else "tuple"}
    else:
        children = _node_children(node, path, target)
        record = {"kind": "node", "name": type(node).__qualname__, "keys": [k for k, _ in children]}
    names = [name for name, _ in children]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise errors.CheckpointError(
            f"mx.save({target!r}): under {path_str(path)}, two keys give the tensor name part(s) "
            f"{twice} (e.g. 1 and '1'), so one array would replace the other. Use distinct keys."
        )
    record["items"] = [_encode(child, (*path, name), tensors, target) for name, child in children]
    return record


def _node_children(node: Any, path: Path, target: str) -> list[tuple[str, Any]]:
    """The keyed children of a registered PyTree node one level down."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if treedef.num_leaves == 1 and len(flat) == 1 and flat[0][1] is node:
        raise errors.CheckpointError(
            f"mx.save({target!r}): the leaf at {path_str(path)} is a {type(node).__name__}, "
            f"not an array. Leaves are jax/NumPy arrays, Python numbers or jax.random keys; "
            f"put other data in metadata= (JSON) or drop it from the tree."
        )
    return [(_part(_entry_key(keys[0]), path, target), child) for keys, child in flat]


def _entry_key(entry: Any) -> Any:
    """The key a ``jax.tree_util`` path entry stands for."""
    for attribute in ("key", "idx", "name"):  # DictKey/FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    return entry


def _encode_leaf(leaf: Any, path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> Any:
    record: dict[str, Any] = {"kind": "array"}
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        record = {"kind": "key", "impl": str(jax.random.key_impl(leaf))}
        leaf = jax.random.key_data(leaf)
    elif isinstance(leaf, bool | int | float | complex):
        leaf = jnp.asarray(leaf)
    array = np.asarray(leaf)
    # Little-endian and contiguous: the bytes safetensors writes are the bytes checksummed.
    tensors["/".join(path)] = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    record["dtype"], record["shape"] = array.dtype.name, list(array.shape)
    return record


def _check_dtypes(safetensors: ModuleType, tensors: dict[str, np.ndarray[Any, Any]], target: str):
    codes = _dtype_codes(safetensors)
    for name, array in tensors.items():
        if array.dtype not in codes.values():
            raise errors.CheckpointError(
                f"mx.save({target!r}): {name} is {array.dtype}, which safetensors cannot store "
                f"(it stores {', '.join(sorted(d.name for d in codes.values()))}). Convert it "
                f"(x.astype(...)) before saving."
            )


def _dtype_codes(safetensors: ModuleType) -> dict[str, np.dtype[Any]]:
    """Each dtype safetensors stores, by its header code (``"BF16"``), asked of safetensors."""
    candidates = [np.dtype(c) for c in "?bBhHiIlLqQefdFD"] + [
        np.dtype(t) for t in vars(ml_dtypes).values() if isinstance(t, type) and _is_scalar(t)
    ]
    codes: dict[str, np.dtype[Any]] = {}
    for dtype in candidates:
        with contextlib.suppress(ValueError, TypeError, safetensors.SafetensorError):
            spec = safetensors.TensorSpec(dtype=dtype.name, shape=[0], data_ptr=0, data_len=0)
            codes[spec.dtype] = dtype
    return codes


def _is_scalar(t: type) -> bool:
    try:
        return np.dtype(t).kind in "biufcV" and np.dtype(t).itemsize > 0
    except TypeError:
        return False


def _checksum(array: np.ndarray[Any, Any]) -> int:
    # CRC-32C (the crc32c package: the CPU's CRC instruction, ~12 GB/s, 4x zlib's CRC-32 here,
    # which cost a verified load 0.24 s per GB): it catches every burst of up to 32 flipped
    # bits and all but 2**-32 of other damage. Corruption on disk or in transfer is the threat,
    # not an attacker (who could rewrite the checksum too), so a cryptographic hash would only
    # cost.
    return _crc32c()(array.reshape(-1).view(np.uint8).data, 0)


def _write_atomically(target: str, write: Callable[[str], None]) -> None:
    """``write(path)`` a file beside ``target``, flush it to disk and rename it over ``target``.

    The file is written in a scratch directory of its own beside ``target``, named after the
    writer (``.model.safetensors.<host>-<pid>.<random>.tmp``), which also holds the
    temporary file safetensors' writer makes itself. A writer killed mid-write leaves its
    directory behind; the next save to the same target from the same host removes those of
    writers no longer running, so a job that keeps crashing while it saves cannot fill the
    disk."""
    directory = os.path.dirname(os.path.abspath(target))
    name = os.path.basename(target)
    _remove_dead_writers(directory, name)
    scratch = os.path.join(directory, f".{name}.{_writer()}.{secrets.token_hex(6)}.tmp")
    os.mkdir(scratch)
    try:
        tmp = os.path.join(scratch, name)
        # Created here (not by mkstemp): the file gets the umask's mode, like any new file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)  # safetensors writes its files private (0600)
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if os.name == "posix":  # the rename itself reaches the disk with the directory's entry
        _fsync(directory, os.O_RDONLY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_dead_writers(directory: str, name: str) -> None:
    """Removes the scratch directories for ``name`` of this host's writers that have died."""
    if os.name != "posix":  # no harmless probe of a process id
        return
    prefix, host = f".{name}.", socket.gethostname()
    for entry in os.scandir(directory):
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        writer = entry.name[len(prefix) : -len(".tmp")].rpartition(".")[0]
        writer_host, _, pid = writer.rpartition("-")
        if writer_host == host and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # none has this id (or could)
        return False
    except PermissionError:  # another user's
        return True
    return True


# --- load -------------------------------------------------------------------------------------


def _read_header(safetensors: ModuleType, file: Any, source: str) -> tuple[dict[str, _Tensor], Any]:
    """The tensors and ``__metadata__`` of the file, validated by safetensors first."""
    try:
        # safetensors checks the header: its size, JSON, dtypes, and that the offsets tile the
        # data exactly with the size each dtype and shape need.
        with safetensors.safe_open(source, framework="np"):
            pass
    except safetensors.SafetensorError as e:
        raise _damaged(source, f"safetensors cannot read it ({e})") from None
    # Read again from our own handle: what was checked is what we read, even if another
    # process renamed a new checkpoint over `source` meanwhile.
    size = os.fstat(file.fileno()).st_size
    head = file.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else size
    if length > size - 8:
        raise _damaged(source, "the header is longer than the file: it is truncated")
    try:
        header = json.loads(file.read(length))
        meta = header.pop("__metadata__", None)
        codes = _dtype_codes(safetensors)
        tensors: dict[str, _Tensor] = {}
        for name, entry in header.items():
            dtype, shape = codes[entry["dtype"]], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
            nbytes = math.prod(shape) * dtype.itemsize
            if begin < 0 or end - begin != nbytes or 8 + length + end > size:
                raise ValueError(f"{name}'s data_offsets {entry['data_offsets']}")
            tensors[name] = _Tensor(dtype, shape, 8 + length + begin, nbytes)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise _damaged(source, f"its header does not describe its data ({e})") from None
    return tensors, meta


def _decode_header(meta: Any, source: str) -> tuple[Any, dict[str, int], Any]:
    if not isinstance(meta, dict) or meta.get(_FORMAT) != _VERSION:
        raise errors.CheckpointError(
            f"{source} is a safetensors file, but not one written by mx.save (its header has no "
            f"{_FORMAT}={_VERSION!r}), so there is no tree or checksum to restore it by. Read "
            f"its tensors with safetensors.numpy.load_file(path) (a flat dict by name), or "
            f"PyTorch/Hugging Face weights with mx.interop.torch.load_state_dict(model, path)."
        )
    try:
        return json.loads(meta[_TREE]), json.loads(meta[_CRC32C]), json.loads(meta[_USER])
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise _damaged(source, f"the tree record in its header is not JSON ({e})") from None


def _damaged(source: str, what: str) -> errors.CheckpointError:
    return errors.CheckpointError(
        f"{source} is not a readable checkpoint: {what}. The file is damaged or of another "
        f"format; load an earlier checkpoint, or save this one again."
    )


def _leaves(record: Any, path: Path, source: str) -> list[_Leaf]:
    """Every leaf of the tree record, in order; a malformed record raises CheckpointError."""
    try:
        return list(_walk(record, path))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise _damaged(source, f"the tree record in its header is malformed ({e!r})") from None


def _walk(record: dict[str, Any], path: Path) -> Iterator[_Leaf]:
    kind = record["kind"]
    if kind in ("array", "key"):
        yield _leaf(record, path)
    elif kind in ("dict", "namedtuple", "node", "list", "tuple"):
        for name, item in zip(_names(record), record["items"], strict=True):
            yield from _walk(item, (*path, name))
    elif kind != "none":
        raise ValueError(f"unknown kind {kind!r}")


def _leaf(record: dict[str, Any], path: Path) -> _Leaf:
    if not path:
        raise ValueError("a leaf at the root")
    impl = record["impl"] if record["kind"] == "key" else None
    return _Leaf(path, impl, str(record["dtype"]), tuple(record["shape"]))


def _names(record: dict[str, Any]) -> list[str]:
    if record["kind"] in ("list", "tuple"):
        return [str(i) for i in range(len(record["items"]))]
    names = [key_str(k) for k in record["keys"]]
    if any(n is None or not n or "/" in n for n in names) or len(set(names)) < len(names):
        raise ValueError(f"bad keys {record['keys']!r}")
    return [str(n) for n in names]


def _check_names(leaves: list[_Leaf], tensors: dict[str, _Tensor], crcs: Any, source: str):
    names = ["/".join(leaf.path) for leaf in leaves]
    if sorted(names) != sorted(tensors) or not isinstance(crcs, dict) or set(crcs) != set(names):
        raise _damaged(source, "the tree record in its header names other tensors than it holds")
    for leaf in leaves:
        tensor = tensors["/".join(leaf.path)]
        if (tensor.dtype.name, tensor.shape) != (leaf.dtype, leaf.shape):
            raise _damaged(
                source,
                f"its header describes {path_str(leaf.path)} as {tensor.dtype.name}"
                f"{list(tensor.shape)}, but it was saved as {leaf.dtype}{list(leaf.shape)}",
            )


def _host_buffer(nbytes: int) -> np.ndarray[Any, Any]:
    """Fresh, 64-byte aligned bytes to read a tensor into.

    JAX's CPU client takes an aligned host buffer as the array's storage instead of copying it
    (a copy would double the peak: measured 1.43x the data against 0.95x). A large one is
    mapped with its pages already in (Linux's MAP_POPULATE: one fault for the whole buffer
    instead of one per 4 KiB page as the read fills it, 0.18 s less per GB here); the mapping
    goes away with the array. The price: a second load in the same process cannot reuse the
    pages the allocator kept from a first one (0.56 s per GB instead of 0.18 then); the first
    load of a process, what starting or resuming a run waits for, is the one made fast.
    """
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is not None and nbytes >= _MAPPED:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)  # page aligned
    spare = np.empty(nbytes + _ALIGN, np.uint8)
    start = -spare.ctypes.data % _ALIGN
    return spare[start : start + nbytes]


class _Reader:
    """Reads one tensor at a time from the open file, checked, as the array to return."""

    def __init__(self, file: Any, source: str, tensors: dict[str, _Tensor], crcs: Any, verify):
        self.file, self.source, self.tensors, self.crcs = file, source, tensors, crcs
        self.verify = verify
        self.checksum = _crc32c() if verify else None

    def abstract(self, leaf: _Leaf) -> jax.ShapeDtypeStruct:
        """The shape and dtype the leaf will have, without reading it."""
        tensor = self.tensors["/".join(leaf.path)]
        data = jax.ShapeDtypeStruct(tensor.shape, tensor.dtype)
        if leaf.impl is None:
            return data
        try:
            return jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=leaf.impl), data)
        except (ValueError, TypeError) as e:
            name = path_str(leaf.path)
            raise _damaged(
                self.source, f"{name} is no key data of impl {leaf.impl!r} ({e})"
            ) from None

    def __call__(self, leaf: _Leaf, sharding: Any = None) -> Any:
        name = "/".join(leaf.path)
        tensor = self.tensors[name]
        buffer = _host_buffer(tensor.nbytes)
        view, done, crc = buffer.data, 0, 0
        while done < tensor.nbytes:
            # In pieces the checksum reads while they are still in the CPU's cache (one pass over
            # memory, not two); preadv may also return less than asked.
            piece = view[done : done + _PIECE]
            n = os.preadv(self.file.fileno(), [piece], tensor.start + done)
            if n == 0:
                raise _damaged(self.source, f"{name} ends past the end of the file")
            if self.checksum is not None:
                crc = self.checksum(piece[:n], crc)
            done += n
        if self.checksum is not None and crc != self.crcs[name]:
            raise _damaged(self.source, f"the checksum of {name} differs: its bytes changed")
        array = buffer.view(tensor.dtype).reshape(tensor.shape)
        if leaf.impl is not None:
            self.abstract(leaf)  # an impl that is no PRNG impl, or data of the wrong shape
            return jax.device_put(
                jax.random.wrap_key_data(jnp.asarray(array), impl=leaf.impl), sharding
            )
        if sharding is None and jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype:
            return array  # 64-bit while jax_enable_x64 is off: a jax.Array would be cast
        # On CPU device_put keeps `buffer` as the array's storage: still one copy in memory.
        return jax.device_put(array, sharding)


def _build(record: dict[str, Any], path: Path, read: _Reader, source: str) -> Any:
    """The tree as saved, without ``like`` (see :func:`load` for the containers)."""
    kind = record["kind"]
    if kind == "none":
        return None
    if kind in ("array", "key"):
        return read(_leaf(record, path))
    names = _names(record)
    items = [
        _build(r, (*path, n), read, source) for n, r in zip(names, record["items"], strict=True)
    ]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    keys = record["keys"] if kind == "dict" else names
    return dict(zip(keys, items, strict=True))


def _load_like(like: Any, leaves: list[_Leaf], read: _Reader, source: str) -> Any:
    """The file's arrays in ``like``'s structure, after one check of every path."""
    if isinstance(like, Module | Transformed):
        flat, treedef = jax.tree_util.tree_flatten_with_path(variable_info(like))
    else:
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    expected = {tuple(str(key_str(_entry_key(k))) for k in keys): leaf for keys, leaf in flat}
    saved = {leaf.path: leaf for leaf in leaves}
    problems = [f"  missing from the file: {path_str(p)}" for p in expected if p not in saved]
    problems += [f"  not in like: {path_str(p)}" for p in saved if p not in expected]
    for p in expected.keys() & saved.keys():
        want, got = _abstract_like(expected[p]), read.abstract(saved[p])
        if (want.shape, want.dtype) != (got.shape, got.dtype):
            problems.append(
                f"  {path_str(p)}: like has {want.dtype}{list(want.shape)}, the file "
                f"{got.dtype}{list(got.shape)}"
            )
    if problems:
        raise errors.CheckpointError(
            f"{source} does not fit `like` at {len(problems)} path(s):\n"
            + "\n".join(problems)
            + "\nLoad with the like= that the file was saved from, or without like= to see "
            "what it holds (mx.load(path))."
        )
    arrays = [read(saved[p], getattr(expected[p], "sharding", None)) for p in expected]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _abstract_like(leaf: Any) -> Any:
    """A ``like`` leaf as something with ``.shape`` and ``.dtype``."""
    if isinstance(leaf, VariableInfo | jax.ShapeDtypeStruct | jax.Array | np.ndarray):
        return leaf
    return jnp.asarray(leaf)
