"""Shared docstring text: one decorator, :func:`fill_docstring`, for every family of functions
or layers whose docstrings repeat a block (the same ``Args:`` entries, the same ``Raises:``).

The shared block is written once, without indentation, and each docstring that uses it holds a
placeholder line ``{name}`` where the block goes. The docstring is filled when the module is
imported, so ``help()``, the documentation and ``pytest --doctest-modules`` all read the full
text. Only the names given are replaced: other braces in a docstring (a dict in an example)
stay as they are. Imports nothing from metoryx, so any module may use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

# A placeholder is alone on its line: its indentation is that of the block it becomes.
_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<name>\w+)\}[ \t]*$", re.MULTILINE)


def fill_docstring(**blocks: str) -> Callable[[_T], _T]:
    """Decorator that replaces each placeholder line ``{name}`` of a docstring by
    ``blocks[name]``, every line of the block indented as the placeholder.

    A placeholder not in ``blocks`` is left alone; a block whose placeholder the docstring
    lacks raises ``ValueError`` at import time, so that a misspelled name cannot ship.
    Docstrings stripped by ``python -OO`` are left as they are.

    Example:
        >>> from metoryx._docstrings import fill_docstring
        >>> @fill_docstring(args="x: the input.\\ny: the other input.")
        ... def add(x, y):
        ...     '''Adds.
        ...
        ...     Args:
        ...         {args}
        ...     '''
        >>> print(add.__doc__.splitlines()[4])
                y: the other input.
    """

    def fill(obj: _T) -> _T:
        doc = obj.__doc__
        if doc is None:
            return obj
        used: set[str] = set()

        def block(match: re.Match[str]) -> str:
            name, indent = match["name"], match["indent"]
            if name not in blocks:
                return match[0]
            used.add(name)
            lines = blocks[name].strip("\n").splitlines()
            return "\n".join(indent + line if line.strip() else "" for line in lines)

        filled = _PLACEHOLDER.sub(block, doc)
        missing = sorted(set(blocks) - used)
        if missing:
            raise ValueError(
                f"fill_docstring: the docstring of {getattr(obj, '__qualname__', obj)!r} has "
                f"no placeholder line for {missing}. Add a line {{{missing[0]}}} where the "
                f"block goes, or drop the block from the decorator."
            )
        obj.__doc__ = filled
        return obj

    return fill
