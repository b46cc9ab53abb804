"""PyTorch ``state_dict`` s in safetensors files, as Hugging Face ships them: read and write.

A Hugging Face model directory holds its weights as ``model.safetensors``, or, for a large
model, as shards ``model-00001-of-00003.safetensors``, ... with an index
``model.safetensors.index.json`` whose ``weight_map`` names the shard of every entry. Entry names
are those of the PyTorch module's ``state_dict()``. :func:`read_state_dict` opens either form
as a mapping of names to NumPy arrays that reads each tensor only when it is asked for, from a
memory map of its file, so that loading a model never holds a second copy of the checkpoint;
:func:`write_state_dict` writes one file that ``transformers`` and ``safetensors.torch`` load.

The files are read and written by the ``safetensors`` package (``pip install
'metoryx[checkpoints]'``), in its NumPy flavour: PyTorch is never imported. bfloat16 tensors
come back as NumPy arrays of ``ml_dtypes.bfloat16``, which JAX takes as they are.

Example:
    >>> import os, tempfile, numpy as np
    >>> from metoryx.interop.safetensors_files import read_state_dict, write_state_dict
    >>> path = os.path.join(tempfile.mkdtemp(), "weights.safetensors")
    >>> write_state_dict(path, {"fc.weight": np.ones((4, 3), np.float32)})
    >>> with read_state_dict(path) as entries:
    ...     print(list(entries), entries["fc.weight"].shape)
    ['fc.weight'] (4, 3)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metoryx import errors
from metoryx.saving import import_safetensors

__all__ = ["read_state_dict", "write_state_dict"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def read_state_dict(path: str | os.PathLike[str]) -> Iterator[Mapping[str, np.ndarray]]:
    """Opens a safetensors checkpoint as a read-only ``state_dict`` of NumPy arrays.

    Each access ``entries[name]`` reads that one tensor from the memory-mapped file; the
    files stay open until the ``with`` block ends.

    Args:
        path: a ``.safetensors`` file; a sharded checkpoint's ``*.index.json`` (its shards
            beside it); or a directory that ``save_pretrained`` wrote, holding
            ``model.safetensors`` or ``model.safetensors.index.json``.

    Yields:
        A mapping of entry names (``"encoder.layer.0.attention.self.query.weight"``) to NumPy
        arrays, in the order of the file (or of the index).

    Raises:
        ImportError: if the ``safetensors`` package is not installed.
        CheckpointError: if the path does not exist, a directory holds neither file, an index
            is not JSON with a ``weight_map`` of entry names to shard files, a shard is
            missing, or a file is no safetensors file (truncated, corrupted, or another
            format such as PyTorch's ``pytorch_model.bin``).

    Example:
        >>> import os, tempfile, numpy as np
        >>> from metoryx.interop.safetensors_files import read_state_dict, write_state_dict
        >>> folder = tempfile.mkdtemp()
        >>> write_state_dict(os.path.join(folder, "model.safetensors"), {"bias": np.zeros(3)})
        >>> with read_state_dict(folder) as entries:   # the directory that holds it
        ...     entries["bias"].tolist()
        [0.0, 0.0, 0.0]
    """
    safetensors = import_safetensors("metoryx.interop.torch.load_state_dict")
    files, shard_of = _checkpoint_files(Path(path))
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for shard in files:
            try:
                handles[shard] = stack.enter_context(
                    safetensors.safe_open(str(shard), framework="numpy")
                )
            except Exception as e:  # SafetensorError, OSError: a torn or foreign file
                raise errors.CheckpointError(
                    f"{shard}: not a readable safetensors file ({e}). Expected the "
                    f"model.safetensors (or shards) that save_pretrained(..., "
                    f"safe_serialization=True) writes; download it again if it was cut "
                    f"short, or convert a pytorch_model.bin with torch.load and pass the "
                    f"state_dict."
                ) from e
        if shard_of is None:  # a single file: its entries are its keys
            shard_of = {name: shard for shard, h in handles.items() for name in h.keys()}
        yield _Entries(shard_of, handles)


def write_state_dict(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a ``state_dict`` of NumPy arrays as one safetensors file.

    The header carries ``{"format": "pt"}``, which ``transformers`` requires of the files it
    loads, and ``metadata``. Entries that share memory (tied weights) are written once each.

    Args:
        path: the file to write, e.g. ``"out/model.safetensors"``; an existing file is
            replaced.
        state_dict: entry names to NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16``).
        metadata: more strings for the header.

    Raises:
        ImportError: if the ``safetensors`` package is not installed.

    Example:
        >>> import os, tempfile, numpy as np, safetensors.numpy
        >>> from metoryx.interop.safetensors_files import write_state_dict
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> write_state_dict(path, {"w": np.eye(2, dtype=np.float32)}, {"step": "7"})
        >>> safetensors.numpy.load_file(path)["w"].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    safetensors = import_safetensors("metoryx.interop.torch.save_state_dict")
    arrays = {name: np.ascontiguousarray(a) for name, a in state_dict.items()}
    header = {"format": "pt", **(metadata or {})}
    safetensors.numpy.save_file(arrays, os.fspath(path), metadata=header)


class _Entries(Mapping[str, np.ndarray]):
    """Entry names to arrays, each read from its open shard when it is looked up."""

    def __init__(self, shard_of: dict[str, Path], handles: dict[Path, Any]):
        self._shard_of, self._handles = shard_of, handles

    def __getitem__(self, name: str) -> np.ndarray:
        return self._handles[self._shard_of[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard_of)

    def __len__(self) -> int:
        return len(self._shard_of)


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The files to open, and an index's entry names to their shards (None for one file)."""
    if path.is_dir():
        found = [path / name for name in (SINGLE_FILE, INDEX_FILE) if (path / name).is_file()]
        if not found:
            present = sorted(p.name for p in path.iterdir() if ".safetensors" in p.name)
            raise errors.CheckpointError(
                f"{path}: the directory holds neither {SINGLE_FILE} nor {INDEX_FILE} (its "
                f"safetensors files: {present or 'none'}). Pass the path of the file to read, "
                f"or the directory that save_pretrained(..., safe_serialization=True) wrote."
            )
        path = found[0]
    if not path.is_file():
        raise errors.CheckpointError(
            f"{path}: no such file. Pass a .safetensors file, a sharded checkpoint's "
            f"{INDEX_FILE}, or the directory holding them."
        )
    if not path.name.endswith(".json"):
        return [path], None
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise errors.CheckpointError(
            f"{path}: not a sharded checkpoint's index ({type(e).__name__}: {e}). Expected JSON "
            f'with a "weight_map" of entry names to shard files, as save_pretrained writes.'
        ) from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise errors.CheckpointError(
            f'{path}: "weight_map" must map entry names to shard file names, got '
            f"{weight_map!r:.80}. Restore the index that save_pretrained wrote."
        )
    shards = {name: path.parent / file for name, file in weight_map.items()}
    missing = sorted({str(s.name) for s in shards.values() if not s.is_file()})
    if missing:
        raise errors.CheckpointError(
            f"{path}: the index names shards that are not beside it: {', '.join(missing)}. "
            f"Download every shard of the checkpoint into {path.parent}."
        )
    return list(dict.fromkeys(shards.values())), shards
