"""The package's imports: no circle, and every dependency points down the layers of
docs/design.md ("Layout"): errors and initializers at the bottom, then the core, the shared
vocabularies, lift/, nn/, interop/, and the public face on top.

The imports are read from the source with ``ast``, so a deferred import inside a function
counts like one at the top of a file: it still ties the two files together. Imports under
``if TYPE_CHECKING:`` never run, so they cannot make a circle; they still must point down.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "metoryx"

# Each group of modules and its rank: a module imports only from lower ranks and its own group.
# A new module or package gets a row here, where its imports put it.
RANKS = {
    "metoryx._docstrings": 0,
    "metoryx.errors": 0,
    "metoryx.initializers": 1,
    "metoryx._core": 2,
    "metoryx.layout": 3,
    "metoryx.intermediates": 3,
    "metoryx.filters": 3,
    "metoryx.surgery": 3,
    "metoryx.saving": 3,  # files: over the core (variable_info), below the layers
    "metoryx.tagging": 4,
    "metoryx.lift": 4,
    "metoryx.summary": 4,  # a capability over the core and intermediates
    "metoryx.nn": 5,
    "metoryx.interop": 6,
    "metoryx.lora": 6,
    "metoryx.precision": 6,  # a capability over nn/ (the normalizations it keeps) and surgery
    "metoryx": 7,  # the public face: __init__.py alone
}


class Import:
    def __init__(self, target, line, type_only):
        self.target, self.line, self.type_only = target, line, type_only


def _modules():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _type_checking_nodes(tree):
    """The statements under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for statement in node.body:
                nodes.update(ast.walk(statement))
    return nodes


def _imports(name, path, is_package, modules):
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_nodes(tree)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from metoryx import errors` imports the module metoryx.errors.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "metoryx" and target != name:
                found.append(Import(target, node.lineno, node in type_only))
    return found


MODULES = _modules()
GRAPH = {
    name: _imports(name, path, is_package, MODULES) for name, (path, is_package) in MODULES.items()
}


def _group(name):
    # "metoryx" is the face alone: a module not in RANKS belongs to no group.
    matches = [g for g in RANKS if name == g or (g != "metoryx" and name.startswith(g + "."))]
    return max(matches, key=len) if matches else None


def _circles():
    """Each circle of run-time imports once, as a list of modules that ends where it starts."""
    edges = {
        name: sorted({i.target for i in imports if not i.type_only and i.target in MODULES})
        for name, imports in GRAPH.items()
    }
    circles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(name, path):
        state[name] = 1
        for target in edges[name]:
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in edges:
        if name not in state:
            visit(name, [name])
    return circles


def test_the_import_graph_is_read():
    assert "metoryx._core.module" in MODULES and "metoryx.nn.linear" in MODULES
    targets = {i.target for i in GRAPH["metoryx.nn.linear"]}
    assert {"metoryx._core.module", "metoryx.errors"} <= targets


def test_there_is_no_import_circle():
    circles = [" -> ".join(circle) for circle in _circles()]
    assert circles == [], (
        "Import circles (deferred imports count): move what both sides need into a lower "
        "module, or the code that needs the upper module into it."
    )


def test_every_module_has_a_place_in_the_layers():
    unplaced = [name for name in MODULES if _group(name) is None]
    assert unplaced == [], "give each a row in RANKS of tests/test_layering.py"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    group = _group(name)
    assert group is not None, "see test_every_module_has_a_place_in_the_layers"
    upward = []
    for i in GRAPH[name]:
        target = _group(i.target)  # None: no such module, or one without a level
        if target != group and (target is None or RANKS[target] >= RANKS[group]):
            upward.append(f"line {i.line}: {i.target}")
    assert upward == [], f"{name} (in {group}) imports from its level or above"


def test_the_core_and_the_layers_import_no_adapter():
    for name, imports in GRAPH.items():
        if _group(name) in ("metoryx._core", "metoryx.nn", "metoryx.layout", "metoryx.lift"):
            assert not [i.target for i in imports if i.target.startswith("metoryx.interop")], name


def test_no_private_name_is_imported_across_files():
    """A name used by another file is package-internal, not private: it has no underscore (in
    a private module such as ``_core/`` that is enough), or the other file uses an accessor."""
    found = []
    for name, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0 and not (node.module or "").startswith("metoryx"):
                continue
            found += [
                f"{name} line {node.lineno}: {alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    assert found == []
