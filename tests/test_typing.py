"""What a user's type checker sees: pyright over a user model, the README and the docs' code.

Module code reads variables as arrays (``x @ self.kernel``); for type checkers a Parameter or
State *is* a ``jax.Array``, so a model written like the README's type-checks with no
annotations, and so does ``layer.kernel.value = ...`` in the definition world.
"""

import doctest
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_MODEL = """
from typing import assert_type

import jax
import jax.numpy as jnp
import metoryx as mx


class Block(mx.Module):
    def __init__(self, size: int):
        super().__init__()
        self.fc = mx.Dense(size, size)
        self.scale = mx.Parameter(mx.initializers.ones, (size,))
        self.steps = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        self.layers = [mx.Dense(size, size), mx.LayerNorm(size)]

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        assert_type(x @ self.fc.kernel, jax.Array)
        assert_type(jnp.tanh(self.scale) * self.scale, jax.Array)
        self.steps = self.steps + 1
        for layer in self.layers:
            x = layer(x)
        x = mx.dropout(x, 0.1, is_training=is_training)
        return self.fc(x) * self.scale


class Wrapper(mx.Module):
    def __init__(self, inner: mx.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


model = Wrapper(Block(4))
block = Block(4)
block.fc.kernel.value = jnp.zeros((4, 4))
block.fc = mx.Dense(4, 4, kernel_init=mx.initializers.glorot_uniform())
init_fn, apply_fn = mx.transform(model)
variables = init_fn(jax.random.key(0))
y, variables = jax.jit(apply_fn)(variables, None, jnp.ones((2, 4)))
"""

# Must be flagged: proves that pyright really sees metoryx's types, not Any.
WRONG = """
import metoryx as mx

label: str = mx.Dense(2, 3).kernel
"""


def _docs_programs() -> dict[str, str]:
    """Each markdown file's code as one program: its doctest examples in order (they share
    globals when run), or for the README its ```python blocks."""
    programs = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        examples = doctest.DocTestParser().get_examples(text)
        if examples:
            source = "".join(example.source for example in examples)
        else:
            source = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
        if source.strip():
            programs[f"doc_{path.stem.lower()}.py"] = source
    return programs


def _pyright(directory: Path) -> list[dict]:
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent)) or shutil.which(
        "pyright"
    )
    assert pyright is not None, "pyright is part of the test extra: pip install -e '.[test]'"
    # extraPaths: an editable install's import hook is invisible to pyright. A missing optional
    # package (torch on Python >= 3.12) is a warning; wrong.py proves metoryx itself resolves.
    config = {
        "pythonVersion": "3.11",
        "typeCheckingMode": "standard",
        "extraPaths": [str(ROOT)],
        "reportMissingImports": "warning",
    }
    (directory / "pyrightconfig.json").write_text(json.dumps(config))
    result = subprocess.run(
        [pyright, "--outputjson", "--pythonpath", sys.executable, str(directory)],
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=300,
    )
    report = json.loads(result.stdout)
    return [d for d in report["generalDiagnostics"] if d["severity"] == "error"]


@pytest.fixture(scope="module")
def diagnostics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """pyright's errors per checked file, from one pyright run over all of them."""
    directory = tmp_path_factory.mktemp("typing")
    files = {"user_model.py": USER_MODEL, "wrong.py": WRONG, **_docs_programs()}
    for name, source in files.items():
        (directory / name).write_text(textwrap.dedent(source))
    found: dict[str, list[str]] = {name: [] for name in files}
    for d in _pyright(directory):
        line = d["range"]["start"]["line"] + 1
        found[Path(d["file"]).name].append(f"line {line}: {d['message']}")
    return found


@pytest.mark.slow
def test_a_user_model_written_like_the_readme_type_checks(diagnostics):
    assert diagnostics["user_model.py"] == []


@pytest.mark.slow
def test_pyright_sees_a_parameter_as_an_array_not_as_any(diagnostics):
    (error,) = diagnostics["wrong.py"]
    assert '"Parameter" is not assignable to "str"' in error


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_docs_programs()))
def test_the_docs_code_type_checks(diagnostics, name):
    assert diagnostics[name] == []
