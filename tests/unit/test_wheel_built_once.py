"""`make test` builds the package's wheel once (about 6 s a build): every test that needs it
takes the session-scoped `wheel` fixture of tests/integration/conftest.py, and nothing else
calls build_wheel (a module fixture or a direct call would build it again)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "build_wheel"
    ]


def _session_fixture(tree: ast.Module, call: ast.Call) -> bool:
    """Whether `call` sits in a function decorated @pytest.fixture(scope="session")."""
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or call not in list(ast.walk(fn)):
            continue
        return any(
            isinstance(d, ast.Call)
            and ast.unparse(d.func) == "pytest.fixture"
            and any(ast.unparse(k) == "scope='session'" for k in d.keywords)
            for d in fn.decorator_list
        )
    return False


def test_the_wheel_is_built_only_by_the_session_fixture() -> None:
    sites: list[str] = []
    for path in sorted(TESTS.rglob("*.py")):
        text = path.read_text()
        if "build_wheel" not in text:
            continue  # parsed only where it could be called
        tree = ast.parse(text, str(path))
        for call in _calls(tree):
            where = f"{path.relative_to(TESTS)}:{call.lineno}"
            if not _session_fixture(tree, call):
                where += " (not in a session-scoped fixture)"
            sites.append(where)
    assert len(sites) == 1, sites
    assert sites[0].startswith("integration/conftest.py:"), sites
    assert "not in a session" not in sites[0], sites
