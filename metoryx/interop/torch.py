"""PyTorch ``state_dict`` s in and out: pretrained PyTorch weights for a metoryx model.

A metoryx model whose attribute names mirror a ``torch.nn.Module``'s reads that module's
``state_dict()`` with :func:`load_state_dict` and writes one with :func:`to_state_dict`. Each
layer converts its own entries (``Dense`` transposes ``weight``, ``Conv`` moves the channel
axes last, ``BatchNorm`` maps ``running_mean`` to its ``mean`` State, ...), as described in
:mod:`metoryx.layout`. The ``state_dict`` may also be a safetensors file on disk, as Hugging
Face ships pretrained weights (one file or shards), and :func:`save_state_dict` writes one:
both go through the ``safetensors`` package, without PyTorch. PyTorch is needed only to produce
tensors in :func:`to_state_dict`; it is imported there and nowhere else in metoryx.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metoryx import errors
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, iter_children
from metoryx._core.paths import Path, flatten_variables, path_str, unflatten_variables
from metoryx._core.tree import walk
from metoryx._core.variables import Variable, numeric_dtype
from metoryx.interop.safetensors_files import read_state_dict, write_state_dict
from metoryx.layout import TorchConversion, torch_conversions

__all__ = ["load_state_dict", "save_state_dict", "to_state_dict"]


def load_state_dict(
    model: Module,
    state_dict: Mapping[str, Any] | str | os.PathLike[str],
    strict: bool = True,
    variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``variables`` of ``model`` holding the weights of a PyTorch ``state_dict``.

    Entry names are attribute paths joined by ``.``, as PyTorch writes them; each layer
    converts its own entries to its variables' layout. Arrays are cast to each variable's
    dtype. Weights shared by two attributes (tied) are read from the first name.

    The ``state_dict`` may also be a safetensors checkpoint on disk, as Hugging Face ships
    them (``model.safetensors``, or the shards of ``model.safetensors.index.json``): it is
    read with the ``safetensors`` package, tensor by tensor from a memory map, without
    PyTorch (:mod:`metoryx.interop.safetensors_files`).

    Args:
        model: the definition-world model whose attribute names mirror the PyTorch module's.
        state_dict: ``torch_module.state_dict()``: names to tensors (or NumPy arrays); or the
            path of a ``.safetensors`` file, of a sharded checkpoint's ``.index.json``, or of
            a directory holding either (what ``save_pretrained`` writes).
        strict: if True, every entry the model expects must be present and no other entry
            may be. If False, unknown entries are ignored and variables without an entry
            keep their array from ``variables``.
        variables: with ``strict=False``, the arrays of the variables the state_dict does not
            cover, e.g. ``init_fn(key)``.

    Returns:
        A ``variables`` dict for ``mx.transform(model)``'s ``apply_fn``.

    Raises:
        LayerConfigError: if ``strict`` is not a bool.
        VariablesStructureError: listing the missing and unexpected entries by name (with
            the variable each missing entry fills), e.g. for a state_dict of another
            architecture; with ``strict=False``, if a variable has neither an entry nor an
            array in ``variables``.
        VariableShapeError: listing every entry whose shape does not fit its variable.
        VariableDtypeError: listing the entries the model reads that are no arrays of numbers.
        CheckpointError: for a path, if the file is missing or no safetensors checkpoint.
        ImportError: for a path, if the ``safetensors`` package is not installed.

    Example:
        >>> import numpy as np, metoryx as mx
        >>> from metoryx.interop.torch import load_state_dict
        >>> state_dict = {"weight": np.ones((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
        >>> variables = load_state_dict(mx.Dense(3, 4), state_dict)   # (out, in) -> (in, out)
        >>> variables["params"]["kernel"].shape
        (3, 4)

        From a file, as ``save_state_dict`` or Hugging Face's ``save_pretrained`` write it:

        >>> import os, tempfile
        >>> from metoryx.interop.torch import save_state_dict
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> save_state_dict(mx.Dense(3, 4), variables, path)
        >>> load_state_dict(mx.Dense(3, 4), path)["params"]["kernel"].shape
        (3, 4)
    """
    strict = bool_argument("load_state_dict", "strict", strict)
    if variables is not None:
        _check_mapping("load_state_dict", "variables", variables, "init_fn(key)")
    if isinstance(state_dict, (str, os.PathLike)):
        with read_state_dict(state_dict) as entries:
            return _load(model, entries, strict, variables)
    _check_mapping("load_state_dict", "state_dict", state_dict, "torch_module.state_dict()")
    return _load(model, state_dict, strict, variables)


def _load(
    model: Module,
    given: Mapping[str, Any],
    strict: bool,
    variables: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """:func:`load_state_dict` of a mapping whose entries are read (converted, cast, copied to
    JAX) one conversion at a time: a checkpoint on disk is never in memory twice."""
    layout = _Layout(model)
    expected = layout.torch_keys()
    _check_names(list(given))
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]

    values: dict[Path, jax.Array] = {}
    wrong: list[str] = []
    not_numbers: list[str] = []
    for conversion, paths in layout.entries:
        if any(name not in given for name in conversion.torch_keys) or not paths:
            continue
        if all(path in values for path in paths):  # a tied weight, read at its first name
            continue
        inputs = [_as_numpy(given[name]) for name in conversion.torch_keys]
        if any(numeric_dtype(a.dtype) is None for a in inputs):
            not_numbers += [
                f"{name} ({a.dtype})"
                for name, a in zip(conversion.torch_keys, inputs, strict=True)
                if numeric_dtype(a.dtype) is None
            ]
            continue
        try:
            arrays = conversion.to_metoryx(*inputs)
        except Exception:
            arrays = None
        if arrays is None or not all(
            np.shape(a) == layout.variables[p].shape for a, p in zip(arrays, paths, strict=True)
        ):
            wrong.append(layout.shape_report(conversion, paths, inputs))
            continue
        for path, array in zip(paths, arrays, strict=True):
            # A copy: on CPU jnp.asarray may alias a NumPy buffer, here the torch module's
            # own storage, which PyTorch updates in place (running statistics, optimizers).
            if path not in values:
                values[path] = jnp.array(array, dtype=layout.variables[path].dtype)
    if not_numbers:
        raise errors.VariableDtypeError(
            f"load_state_dict: these entries are not arrays of numbers: "
            f"{', '.join(not_numbers)}. Pass tensors or arrays, as torch_module.state_dict() "
            f"holds."
        )
    if wrong:
        raise errors.VariableShapeError(
            "load_state_dict: these entries do not fit the model's variables:\n  "
            + "\n  ".join(wrong)
            + "\nThe model's layers must be built with the sizes of the PyTorch module "
            "(in_size, out_size, kernel_size, ...); compare print(model) with the module."
        )
    if strict and (missing or unexpected):
        raise errors.VariablesStructureError(layout.mismatch_report(missing, unexpected))

    base = flatten_variables(variables) if variables is not None else {}
    unfilled = [p for p in layout.variables if p not in values and p not in base]
    if unfilled:
        raise errors.VariablesStructureError(
            f"load_state_dict(strict=False): {len(unfilled)} variables have no entry in the "
            f"state_dict and no array in `variables`: {', '.join(map(path_str, unfilled))}. "
            f"Pass variables=init_fn(key) to start them from their initializers."
        )
    return unflatten_variables(
        {
            path: values[path] if path in values else jnp.array(base[path], dtype=var.dtype)
            for path, var in layout.variables.items()
        }
    )


def to_state_dict(model: Module, variables: Mapping[str, Any]) -> dict[str, Any]:
    """A PyTorch ``state_dict`` holding ``variables``: the inverse of :func:`load_state_dict`.

    The result loads into the PyTorch module that ``model`` mirrors with
    ``torch_module.load_state_dict(...)``. Entries PyTorch keeps and metoryx does not (such as
    BatchNorm's ``num_batches_tracked``) get a neutral value. The conversions are linear maps,
    so ``to_state_dict(model, grads)`` also lays out a gradient as PyTorch's ``.grad`` s.
    :func:`save_state_dict` writes the same entries to a safetensors file, without PyTorch.

    Args:
        model: the definition-world model.
        variables: its ``variables`` dict (or any tree of the same paths, e.g. gradients).

    Returns:
        A dict of entry names to CPU ``torch.Tensor`` s, in the model's attribute order.

    Raises:
        ImportError: if PyTorch is not installed.
        VariablesStructureError: listing the model's variables missing from ``variables``.
        VariableDtypeError, VariableShapeError: listing the arrays of ``variables`` that are
            no numbers, or not of their variables' shapes.

    Example:
        >>> import jax, metoryx as mx
        >>> from metoryx.interop.torch import to_state_dict
        >>> model = mx.Dense(3, 4)
        >>> state_dict = to_state_dict(model, mx.init(model)(jax.random.key(0)))
        >>> {name: tuple(t.shape) for name, t in state_dict.items()}
        {'weight': (4, 3), 'bias': (4,)}
    """
    arrays = _torch_arrays("to_state_dict", model, variables)
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "metoryx.interop.torch.to_state_dict makes torch tensors and needs PyTorch: "
            "pip install torch. To write a file without PyTorch, use save_state_dict."
        ) from e
    return {name: _as_tensor(torch, array) for name, array in arrays.items()}


def save_state_dict(
    model: Module,
    variables: Mapping[str, Any],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``to_state_dict(model, variables)`` as a safetensors file, without PyTorch.

    The file loads back with :func:`load_state_dict`, with ``safetensors.torch.load_file``
    into the PyTorch module that ``model`` mirrors, and, named ``model.safetensors`` in a
    directory with the model's ``config.json``, with ``transformers``'
    ``from_pretrained``. Arrays keep their dtypes (bfloat16 included). The file is written
    with the ``safetensors`` package (:mod:`metoryx.interop.safetensors_files`).

    Args:
        model: the definition-world model.
        variables: its ``variables`` dict.
        path: the file to write, e.g. ``"out/model.safetensors"``; an existing file is
            replaced.
        metadata: strings for the file's header, beside ``{"format": "pt"}``.

    Raises:
        ImportError: if the ``safetensors`` package is not installed.
        VariablesStructureError, VariableDtypeError, VariableShapeError: as
            :func:`to_state_dict`.

    Example:
        >>> import os, tempfile, jax, safetensors.numpy, metoryx as mx
        >>> from metoryx.interop.torch import save_state_dict
        >>> model = mx.Dense(3, 4)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> save_state_dict(model, mx.init(model)(jax.random.key(0)), path)
        >>> {k: v.shape for k, v in sorted(safetensors.numpy.load_file(path).items())}
        {'bias': (4,), 'weight': (4, 3)}
    """
    write_state_dict(path, _torch_arrays("save_state_dict", model, variables), metadata)


def _torch_arrays(function: str, model: Module, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of :func:`to_state_dict` as NumPy arrays, in the model's attribute order."""
    _check_mapping(function, "variables", variables, "init_fn(key)")
    layout = _Layout(model)
    flat = flatten_variables(variables)
    missing = [path_str(p) for p in layout.variables if p not in flat]
    if missing:
        raise errors.VariablesStructureError(
            f"{function}: `variables` lacks {len(missing)} of the model's variables: "
            f"{', '.join(missing)}. Pass the dict that init_fn/apply_fn returned for this model."
        )
    arrays_of = {p: _as_numpy(flat[p]) for p in layout.variables}
    for kind, error, fits in (
        ("arrays of numbers", errors.VariableDtypeError, _is_numeric),
        ("of the variables' shapes", errors.VariableShapeError, _fits_shape),
    ):
        wrong = [
            f"{path_str(p)}: expected {var.dtype.name}{list(var.shape)}, got "
            f"{arrays_of[p].dtype.name}{list(arrays_of[p].shape)}"
            for p, var in layout.variables.items()
            if not fits(arrays_of[p], var)
        ]
        if wrong:
            raise error(
                f"{function}: these arrays of `variables` are not {kind}:\n  "
                + "\n  ".join(wrong)
                + "\nPass the dict that init_fn/apply_fn returned for this model."
            )
    result: dict[str, Any] = {}
    for conversion, paths in layout.entries:
        arrays = conversion.to_torch(*(arrays_of[p] for p in paths))
        for name, array in zip(conversion.torch_keys, arrays, strict=True):
            result.setdefault(name, np.asarray(array))
    return result


class _Layout:
    """The conversions of a model, with each one's variables resolved to collection paths."""

    def __init__(self, model: Module):
        tree = walk(model)  # validates the structure (no cycles, reachable variables)
        if tree.axes:
            stacked = ", ".join(path_str(p) for p in list(tree.axes)[:4])
            more = ", ..." if len(tree.axes) > 4 else ""
            raise errors.LayerConfigError(
                f"The model stores stacked variables ({stacked}{more}: "
                f"one copy per layer of an mx.Repeat, mx.scan or mx.vmap), which PyTorch keeps "
                f"as separate layers. Convert with the unrolled model (the same attributes with "
                f"a list of layers), then mx.stack(model, variables) into this one; back with "
                f"mx.unstack."
            )
        first_path = {id(var): path for path, var in tree.variables}
        self.variables: dict[Path, Variable] = dict(tree.variables)
        by_attribute = dict(_attribute_paths(model, ()))
        self.entries: list[tuple[TorchConversion, tuple[Path, ...]]] = [
            (c, tuple(first_path[id(by_attribute[v])] for v in c.variables))
            for c in torch_conversions(model)
        ]

    def torch_keys(self) -> dict[str, Path | None]:
        """Every entry name the model expects, with the first variable it fills."""
        keys: dict[str, Path | None] = {}
        for conversion, paths in self.entries:
            for name in conversion.torch_keys:
                keys.setdefault(name, paths[0] if paths else None)
        return keys

    def mismatch_report(self, missing: list[str], unexpected: list[str]) -> str:
        keys = self.torch_keys()
        lines = ["load_state_dict: the state_dict does not match the model."]
        if missing:
            described = [
                name if (path := keys[name]) is None else f"{name} (for {path_str(path)})"
                for name in missing
            ]
            lines.append(f"Missing ({len(missing)}): " + ", ".join(described))
        if unexpected:
            lines.append(f"Unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        lines.append(
            "The model's attribute names must mirror the PyTorch module's (print both to "
            "compare), and its layers must be the counterparts of the module's. To load a "
            "part of a state_dict, pass strict=False and variables=init_fn(key)."
        )
        return "\n".join(lines)

    def shape_report(
        self, conversion: TorchConversion, paths: tuple[Path, ...], inputs: list[np.ndarray]
    ) -> str:
        wanted = [np.zeros(self.variables[p].shape, self.variables[p].dtype) for p in paths]
        expected = [np.shape(a) for a in conversion.to_torch(*wanted)]
        return (
            "; ".join(
                f"{name}: expected {tuple(shape)}, got {np.shape(given)}"
                for name, shape, given in zip(conversion.torch_keys, expected, inputs, strict=True)
                if tuple(shape) != np.shape(given)
            )
            + f" (for {', '.join(map(path_str, paths))})"
        )


def _attribute_paths(module: Module, prefix: tuple[str, ...]) -> list[tuple[str, Variable]]:
    """``("a/b/kernel", variable)`` for every attribute path, shared objects at each path."""
    found: list[tuple[str, Variable]] = []
    for rel, child in iter_children(module):
        path = (*prefix, *rel)
        if isinstance(child, Variable):
            found.append(("/".join(path), child))
        else:
            found.extend(_attribute_paths(child, path))
    return found


def _is_numeric(array: np.ndarray, var: Variable) -> bool:
    return numeric_dtype(array.dtype) is not None


def _fits_shape(array: np.ndarray, var: Variable) -> bool:
    return array.shape == var.shape


def _check_mapping(function: str, name: str, value: Any, example: str) -> None:
    if not isinstance(value, Mapping):
        raise errors.VariablesStructureError(
            f"{function}: `{name}` must be a dict (a Mapping) of names to arrays, such as "
            f"{example} returns; got {type(value).__name__} {value!r:.60}. Pass that dict."
        )


def _check_names(names: list[Any]) -> None:
    not_str = [name for name in names if not isinstance(name, str)]
    if not_str:
        raise errors.VariablesStructureError(
            f"load_state_dict: entry names must be strs such as 'fc.weight', as PyTorch writes "
            f"them; got {not_str[:5]!r}. Pass torch_module.state_dict() or a dict like it."
        )


def _as_numpy(value: Any) -> np.ndarray:
    """A NumPy array of a torch tensor (on any device, bfloat16 included) or any array."""
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 is exact
            value = value.float()
        return value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError):  # e.g. a ragged list: the callers name it as no array
        return np.array(None, dtype=object)


def _as_tensor(torch: Any, array: np.ndarray) -> Any:
    # A writable C-ordered copy of its own: the tensor must not alias a JAX buffer.
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, order="C", copy=True))
