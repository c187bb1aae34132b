"""The request flows down: the handler (``dialproxy.web``) calls ``dialproxy.upstream``, which
never imports the web package back, neither in its own source nor through what it imports;
every outbound request is made in ``dialproxy.upstream``, none in ``dialproxy.web``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dialproxy.upstream
import dialproxy.web

UPSTREAM = Path(dialproxy.upstream.__file__).parent
MODULES = sorted(p.stem for p in UPSTREAM.glob("*.py") if p.stem != "__init__")
WEB = Path(dialproxy.web.__file__).parent
WEB_MODULES = sorted(p.stem for p in WEB.glob("*.py") if p.stem != "__init__")
HTTP_METHODS = {"request", "get", "post", "put", "patch", "delete", "head", "options", "ws_connect"}


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
    assert {"outbound", "answer", "attempts", "balancer"} <= set(MODULES)
    assert {"dialroute", "followup", "feature"} <= set(MODULES)


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


def _outbound_calls(path: Path) -> list[str]:
    """The calls in ``path`` that make an HTTP request on an aiohttp client (a name or an
    attribute called ``client``/``session``: ``client.request(...)``, ``app[CLIENT]`` too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in HTTP_METHODS:
            continue
        owner = node.func.value
        named = (
            owner.id
            if isinstance(owner, ast.Name)
            else owner.attr
            if isinstance(owner, ast.Attribute)
            else ast.unparse(owner)
            if isinstance(owner, ast.Subscript)
            else ""
        )
        if named.lower() in ("client", "session") or "CLIENT" in named:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    return found


@pytest.mark.parametrize("module", WEB_MODULES)
def test_web_makes_no_outbound_request(module: str) -> None:
    """The handlers plan, call ``dialproxy.upstream`` and answer: every request to an
    upstream is made there."""
    assert _outbound_calls(WEB / f"{module}.py") == []


def test_the_outbound_check_sees_an_outbound_call() -> None:
    calls = _outbound_calls(UPSTREAM / "dialroute.py") + _outbound_calls(UPSTREAM / "feature.py")
    assert [c.split(": ")[1] for c in calls] == ["client.request", "client.request"]
