"""The package's shape: no import cycles among capscale's modules, no module citing
design notes that are not in the repository, and module sizes a reader can follow."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "capscale"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING") or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


def _target(node: ast.ImportFrom, package: str) -> str:
    """The absolute module an ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: Path) -> set[str]:
    """capscale modules ``path`` imports when it runs: at module level and inside
    functions (a lazy import closes a cycle as surely as an eager one, only later);
    only ``if TYPE_CHECKING:`` blocks, which never run, are left out. Importing
    ``a.b.c`` also runs the packages ``a.b`` and ``a``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("capscale"))
        elif isinstance(node, ast.ImportFrom):
            mod = _target(node, package)
            if mod.startswith("capscale"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        pending.extend(ast.iter_child_nodes(node))
    parents = {".".join(m.split(".")[:k]) for m in out for k in range(2, m.count(".") + 1)}
    return out | parents


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for m, p in modules.items():
        # a module's own parent packages are already running when it is imported
        graph[m] = {i for i in _imports(p) if i in modules and i != m
                    and not m.startswith(i + ".")}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_cycle_detector_finds_a_planted_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "capscale"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("from capscale.a import y\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "capscale.a -> capscale.b -> capscale.a" in str(err)
    else:
        raise AssertionError("the planted cycle was not found")


def test_cycle_detector_finds_a_lazy_cycle(tmp_path, monkeypatch):
    """A cycle closed by an import inside a function is a cycle too."""
    pkg = tmp_path / "capscale"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from capscale.sub.b import x\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from capscale.c import z\n"
        "def f():\n    from ..a import y\n    return y\n")
    (pkg / "c.py").write_text("from capscale.sub.b import x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "capscale.a -> capscale.sub.b -> capscale.a" in str(err)
    else:
        raise AssertionError("the lazy cycle was not found")


def test_config_imports_nothing_of_the_domain():
    """config/ checks its sections alone; rules across sections and table names live
    above the tables (capscale.checks)."""
    allowed = {"capscale.config", "capscale.errors"}
    for m, deps in _graph().items():
        if m.startswith("capscale.config"):
            outside = {d for d in deps if not any(d == a or d.startswith(a + ".")
                                                  for a in allowed)}
            assert not outside, f"{m} imports {sorted(outside)}"


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for p in PKG.rglob("*.py"):
        if p.name != "__init__.py":
            names.setdefault(p.stem, []).append(str(p.relative_to(PKG)))
    clashes = {k: v for k, v in names.items() if len(v) > 1}
    assert not clashes, clashes


def test_the_top_level_stays_small():
    flat = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert len(flat) <= 10, sorted(flat)


def test_no_citation_of_notes_outside_the_repository():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        for note in ("CAP_SPEC", "SCALE_OUT", "STYLE.md", "SLURM_LOCAL", "OFFLINE_ASSETS"):
            assert note not in text, f"{path} cites {note}"


def test_modules_stay_readable():
    for path in PKG.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.relative_to(PKG)} has {lines} lines"
