"""Variable paths and the flatten/unflatten of ``variables`` dicts.

A path is a tuple of strings: the collection first, then attribute names, list indices and dict
keys from the root module, e.g. ``("params", "layers", "0", "kernel")``. Its text form joins the
parts with ``/``. Paths are the storage format of checkpoints, so they stay readable and stable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from metoryx import errors

Path = tuple[str, ...]

#: What a path part cannot hold: ``/`` joins the parts of a path (``params/fc/kernel``: the
#: text of error messages and the hash of init keys) and ``.`` joins PyTorch ``state_dict``
#: names (``fc.weight``). A dict key ``"a/b"`` beside ``{"a": {"b": ...}}`` would otherwise
#: name two variables alike, and one would silently take the other's key or entry.
SEPARATORS = ("/", ".")


def part_problem(part: str) -> str | None:
    """Why ``part`` cannot be a path part (it is empty or holds a separator), else None."""
    if not part:
        return "an empty name"
    for sep in SEPARATORS:
        if sep in part:
            return (
                f"{part!r}, which holds {sep!r}: '/' joins path parts and '.' PyTorch names, "
                f"so it could name two variables alike"
            )
    return None


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
                visit(cast("Mapping[Any, Any]", value), path)
            elif path in flat:
                raise errors.VariablesStructureError(
                    f"Two keys of `variables` give the path {path_str(path)!r} (e.g. 1 and "
                    f"'1'), so one array would silently replace the other. Key each level by "
                    f"the str names init_fn uses."
                )
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
