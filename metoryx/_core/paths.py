"""Variable paths and the flatten/unflatten of ``variables`` dicts.

A path is a tuple of strings: the collection first, then attribute names, list indices and dict
keys from the root module, e.g. ``("params", "layers", "0", "kernel")``. Its text form joins the
parts with ``/``. Paths are the storage format of checkpoints, so they stay readable and stable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Path = tuple[str, ...]


def path_str(path: Iterable[str]) -> str:
    """``("params", "fc1", "kernel")`` -> ``"params/fc1/kernel"``; the empty path is ``<root>``."""
    text = "/".join(path)
    return text or "<root>"


def key_str(key: Any) -> str | None:
    """The path part of a container key: strings as they are, ints as decimals, else ``None``."""
    if isinstance(key, str):
        return key
    if isinstance(key, int):
        return str(key)
    return None


def flatten_variables(variables: Mapping[str, Any]) -> dict[Path, Any]:
    """Nested dicts -> ``{path: leaf}``; every non-dict value is a leaf."""
    flat: dict[Path, Any] = {}

    def visit(node: Mapping[str, Any], prefix: Path) -> None:
        for key, value in node.items():
            path = (*prefix, str(key))
            if isinstance(value, Mapping):
                visit(value, path)
            else:
                flat[path] = value

    visit(variables, ())
    return flat


def unflatten_variables(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """``{path: leaf}`` -> nested dicts, the inverse of :func:`flatten_variables`."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested
