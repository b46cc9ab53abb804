"""The public face: every name in ``mx.__all__`` exists, is documented, and shows an example."""

import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

import metoryx as mx
from metoryx import initializers
from metoryx.nn import activations

# Activations are JAX's own functions, re-exported as they are; JAX documents them.
REEXPORTED_FROM_JAX = {
    name for name in activations.__all__ if getattr(activations, name).__module__.startswith("jax")
}


def _ours(names):
    return sorted(set(names) - REEXPORTED_FROM_JAX)


def test_all_names_exist_and_are_unique():
    assert len(mx.__all__) == len(set(mx.__all__))
    missing = [name for name in mx.__all__ if not hasattr(mx, name)]
    assert missing == []


@pytest.mark.parametrize("name", _ours(mx.__all__))
def test_every_public_name_has_a_runnable_example(name):
    doc = inspect.getdoc(getattr(mx, name))
    assert doc, f"mx.{name} has no docstring"
    assert ">>>" in doc, f"mx.{name}'s docstring has no runnable example"


@pytest.mark.parametrize("name", sorted(REEXPORTED_FROM_JAX))
def test_activations_are_reexported_and_documented(name):
    assert getattr(mx, name) is getattr(activations, name)
    assert inspect.getdoc(getattr(mx, name))


@pytest.mark.parametrize("name", initializers.__all__)
def test_every_initializer_is_documented_with_an_example(name):
    obj = getattr(initializers, name)
    doc = inspect.getdoc(obj)
    assert doc and ">>>" in doc, f"mx.initializers.{name} lacks a docstring example"


@pytest.mark.parametrize(
    ("module", "name"),
    [(m, n) for m in (mx.layout, mx.interop.torch, mx.filters) for n in m.__all__],
)
def test_every_layout_interop_and_filters_name_is_documented_with_an_example(module, name):
    doc = inspect.getdoc(getattr(module, name))
    assert doc and ">>>" in doc, f"{module.__name__}.{name} lacks a docstring example"


@pytest.mark.parametrize("name", mx.errors.__all__)
def test_every_error_subclasses_a_builtin_and_has_an_example(name):
    cls = getattr(mx.errors, name)
    doc = inspect.getdoc(cls)
    assert doc and ">>>" in doc
    if issubclass(cls, Warning) or cls is mx.errors.MetoryxError:
        return
    assert issubclass(cls, mx.errors.MetoryxError)
    builtins = (ValueError, TypeError, KeyError, RuntimeError, AttributeError)
    assert issubclass(cls, builtins), f"{name} subclasses no matching builtin"


def _layers_with_dtypes():
    return sorted(
        name
        for name in mx.__all__
        if inspect.isclass(getattr(mx, name))
        and issubclass(getattr(mx, name), mx.Module)
        and "param_dtype" in inspect.signature(getattr(mx, name)).parameters
    )


def test_the_dtype_check_covers_the_layers():
    assert {"Dense", "Conv", "BatchNorm"} <= set(_layers_with_dtypes())


@pytest.mark.parametrize("name", _layers_with_dtypes())
def test_layer_docstrings_explain_dtype_and_param_dtype(name):
    doc = inspect.getdoc(getattr(mx, name))
    assert "computation" in doc and "param_dtype" in doc and "storage" in doc


@pytest.mark.parametrize("package", [mx.nn, mx.lift], ids=lambda p: p.__name__)
def test_subpackage_faces_are_the_top_level_names(package):
    assert len(package.__all__) == len(set(package.__all__))
    for name in package.__all__:
        assert name in mx.__all__, f"{package.__name__}.{name} is missing from mx.__all__"
        assert getattr(package, name) is getattr(mx, name)


def test_every_layer_file_is_reexported_by_mx_nn():
    unlisted = []
    for info in pkgutil.iter_modules(mx.nn.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"metoryx.nn.{info.name}")
        for name, obj in vars(module).items():
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if defined_here and not name.startswith("_") and name not in mx.nn.__all__:
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    unlisted.append(f"{module.__name__}.{name}")
    assert unlisted == [], "re-export them in metoryx/nn/__init__.py (or make them private)"


def test_internal_helpers_are_not_public():
    assert not hasattr(mx, "module_label")
    assert not [name for name in mx.__all__ if name.startswith("_")]


def test_examples_import_what_users_import():
    """Examples use ``mx.X`` (or a public module such as ``mx.interop.torch``), never a layer's
    file or a private module; the docstrings of private modules may show their own names."""
    root = pathlib.Path(__file__).resolve().parent.parent
    files = [*(root / "metoryx").rglob("*.py"), *(root / "docs").glob("*.md"), root / "README.md"]
    private = re.compile(r">>> (from|import) metoryx\.(nn|lift|_\w+)\b")
    found = [
        f"{path.relative_to(root)}:{number}"
        for path in files
        if not any(part.startswith("_") and part != "__init__.py" for part in path.parts[-3:])
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert found == []
