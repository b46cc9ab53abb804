"""Variable paths and the flatten/unflatten of ``variables`` dicts.

A path is a tuple of strings: the collection first, then attribute names, list indices and dict
keys from the root module, e.g. ``("params", "layers", "0", "kernel")``. Its text form joins the
parts with ``/``. Paths are the storage format of checkpoints, so they stay readable and stable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
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


#: The characters that make a path-pattern part a wildcard rather than a literal name.
_WILDCARDS = frozenset("*?[")


def glob_problem(pattern: Any) -> str | None:
    """Why ``pattern`` is not a path glob (see :func:`glob_matcher`), else None."""
    if not isinstance(pattern, str):
        return f"a path glob is a str, got {type(pattern).__name__} {pattern!r:.40}"
    if not pattern or pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        return (
            f"{pattern!r} has an empty part; write the parts joined by single '/' such as "
            f"'params/encoder/**/kernel'"
        )
    for part in pattern.split("/"):
        if "**" in part and part != "**":
            return f"{pattern!r}: '**' spans whole levels and must be a part of its own ('a/**/b')"
        if part.count("[") != part.count("]"):
            return f"{pattern!r}: the part {part!r} opens a '[...]' class it does not close"
    return None


def glob_matcher(pattern: str, prefix: bool = False) -> Callable[[Path], bool]:
    """A predicate telling whether a path matches the glob ``pattern``.

    The pattern's parts are joined by ``/`` as paths are (``"params/encoder/**/kernel"``).
    Each part matches one level with ``fnmatch`` rules (``*``, ``?``, ``[abc]``, ``[!abc]``,
    case sensitive), and a part ``**`` matches any number of levels, none included. With
    ``prefix=True`` a pattern that matches the start of a path matches the path too, so that
    ``"params/encoder"`` selects everything under that module. The caller checks the pattern
    with :func:`glob_problem` first.

    Example:
        >>> from metoryx._core.paths import glob_matcher
        >>> match = glob_matcher("params/**/kernel")
        >>> match(("params", "kernel")), match(("params", "a", "b", "kernel"))
        (True, True)
        >>> glob_matcher("params/enc*", prefix=True)(("params", "encoder", "fc", "bias"))
        True
    """
    parts = tuple(pattern.split("/"))
    if all(p != "**" and not (_WILDCARDS & set(p)) for p in parts):
        # The common case, a plain path: compared as tuples.
        if prefix:
            return lambda path: path[: len(parts)] == parts
        return lambda path: path == parts
    levels = [None if p == "**" else re.compile(_part_regex(p) + r"\Z", re.DOTALL) for p in parts]

    def match(path: Path) -> bool:
        # reached[j]: the parts so far match the first j levels of the path.
        reached = [True] + [False] * len(path)
        for level in levels:
            if level is None:  # '**': any number of levels, none included
                for j in range(1, len(reached)):
                    reached[j] = reached[j] or reached[j - 1]
            else:
                for j in range(len(reached) - 1, 0, -1):
                    reached[j] = reached[j - 1] and level.match(path[j - 1]) is not None
                reached[0] = False
        return any(reached) if prefix else reached[-1]

    return match


def _part_regex(part: str) -> str:
    """One level's fnmatch pattern as a regex that never crosses a ``/``."""
    out: list[str] = []
    i = 0
    while i < len(part):
        char = part[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = part.index("]", i + 2 if part[i + 1 : i + 2] in ("!", "]") else i + 1)
            body = part[i + 1 : end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[{'^/' if negate else ''}{body}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)
