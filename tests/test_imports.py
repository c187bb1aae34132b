"""The package's modules import each other one way only: no import cycle between them.

Every ``import`` in a module counts, wherever it stands: at the top, inside a function, and
under ``if TYPE_CHECKING:``.  A ``TYPE_CHECKING`` import is still a dependency (the module
cannot be read, type-checked or moved without the other); it only hides the cycle from the
interpreter, which is how ``auth`` and ``sharedkeys`` used to need each other unnoticed.
When one module needs only the shape of another's object, it describes that shape with a
``Protocol`` of its own (see ``auth.SharedKeyFinder``, ``ledger.Outcome``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dialproxy

PACKAGE = Path(dialproxy.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("dialproxy", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from p import m`` names module ``p.m``
    when there is one; a package's ``__init__`` counts as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in known else source)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_no_import_cycle_between_modules() -> None:
    edges = graph()
    found = cycles(edges)
    described = [" ; ".join(f"{m} -> {sorted(edges[m] & set(c))}" for m in c) for c in found]
    assert found == [], "import cycles:\n" + "\n".join(described)


def test_the_check_sees_a_cycle_and_type_checking_imports() -> None:
    """The check itself: a cycle through a ``TYPE_CHECKING`` import is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    auth = PACKAGE / "auth.py"
    names = set(modules())
    # auth imports the shared key's model under TYPE_CHECKING only: it is seen
    assert "dialproxy.sharedkeys.model" in imports("dialproxy.auth", auth, names)


def component(module: str) -> str:
    """A module's place in the package graph: its subpackage (``dialproxy.web``...) when it
    is in one, else the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_no_import_cycle_between_packages() -> None:
    """Packages import each other one way too (``web`` -> ``upstream`` -> ``apis`` ->
    ``wire``...): a package is one layer, none is imported back by what it imports."""
    packages: dict[str, set[str]] = {}
    for name, deps in graph().items():
        packages.setdefault(component(name), set()).update(
            component(d) for d in deps if component(d) != component(name)
        )
    assert component("dialproxy.web.proxy") == "dialproxy.web"
    assert component("dialproxy.auth") == "dialproxy.auth"
    found = cycles(packages)
    described = [" ; ".join(f"{p} -> {sorted(packages[p] & set(c))}" for p in c) for c in found]
    assert found == [], "import cycles between packages:\n" + "\n".join(described)
