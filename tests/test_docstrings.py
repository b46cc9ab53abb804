"""fill_docstring: shared blocks indented where their placeholders stand; no placeholder is
left unfilled anywhere in the package."""

import importlib
import inspect
import pkgutil
import re

import pytest

import metoryx
from metoryx._docstrings import fill_docstring

BLOCK = "Args:\n    x: the input.\n\n    y: the other one."


def test_fills_each_line_at_the_placeholder_indentation():
    @fill_docstring(args=BLOCK)
    def f():
        """Does nothing.

        {args}

        Example:
            >>> {"a": 1}
            {'a': 1}
        """

    lines = f.__doc__.splitlines()
    assert lines[2:6] == [
        "        Args:",
        "            x: the input.",
        "",
        "            y: the other one.",
    ]
    assert '>>> {"a": 1}' in f.__doc__  # other braces are left alone


def test_fills_a_class_and_keeps_unknown_placeholders():
    @fill_docstring(args="a: one.")
    class C:
        """C.

        {args}
        {other}
        """

    assert "    a: one." in C.__doc__ and "{other}" in C.__doc__


def test_a_block_without_its_placeholder_is_an_error():
    with pytest.raises(ValueError, match=r"no placeholder line for \['args'\].*\{args\}"):

        @fill_docstring(args="a: one.")
        def f():
            """Inline {args} does not count."""


def test_no_docstring_is_left_as_it_is():
    def f():
        pass

    assert fill_docstring(args="a: one.")(f) is f and f.__doc__ is None


def _documented_objects():
    for info in pkgutil.walk_packages(metoryx.__path__, "metoryx."):
        module = importlib.import_module(info.name)
        yield module.__name__, module
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) == module.__name__:
                yield f"{module.__name__}.{name}", obj


def test_no_placeholder_is_left_in_the_package():
    placeholder = re.compile(r"^\s*\{\w+\}\s*$", re.MULTILINE)
    left = [where for where, obj in _documented_objects() if placeholder.search(obj.__doc__ or "")]
    assert left == []
    assert inspect.getdoc(metoryx.initializers.glorot_uniform).count("in_axis:") == 1
