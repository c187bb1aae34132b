"""The request flows down: the handler (``dialproxy.web``) calls ``dialproxy.upstream``, which
never imports the web package back, neither in its own source nor through what it imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dialproxy.upstream

UPSTREAM = Path(dialproxy.upstream.__file__).parent
MODULES = sorted(p.stem for p in UPSTREAM.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """Every module ``path`` names in an import statement (under TYPE_CHECKING too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_package_has_its_modules() -> None:
    assert {"outbound", "answer", "headers", "attempts", "relay"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_upstream_source_never_imports_web(module: str) -> None:
    back = sorted(
        name
        for name in _imported(UPSTREAM / f"{module}.py")
        if name == "dialproxy.web" or name.startswith("dialproxy.web.")
    )
    assert back == []


def test_importing_upstream_loads_nothing_of_web() -> None:
    imports = "; ".join(f"import dialproxy.upstream.{m}" for m in MODULES)
    shown = "print(sorted(n for n in sys.modules if n.startswith('dialproxy.web')))"
    code = f"import sys; {imports}; {shown}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
