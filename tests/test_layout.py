"""The package layout: one import namespace, every package folder installed, no import cycles."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"storelink": ROOT / "gateway", "storelink.drivers": ROOT / "drivers"}


def _package_folders() -> dict[str, Path]:
    """Every folder with an __init__.py, by the import name it installs as."""
    out: dict[str, Path] = {}
    for top, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            name = ".".join([top, *rel.parts]) if rel.parts else top
            if top == "storelink" and rel.parts[:1] == ("drivers",):
                continue
            out[name] = init.parent
    return out


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in _package_folders().items():
        for py in folder.glob("*.py"):
            mods[pkg if py.name == "__init__.py" else f"{pkg}.{py.stem}"] = py
    return mods


def test_every_package_folder_is_installed() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert conf["package-dir"] == {"storelink": "gateway", "storelink.drivers": "drivers"}
    assert sorted(conf["packages"]) == sorted(_package_folders()), "pyproject's packages list is out of date"


def test_only_storelink_is_imported_at_top_level() -> None:
    """No module imports the folder names gateway or drivers (they do not exist once installed)."""
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{name}: {t}" for t in targets if t.split(".")[0] in ("gateway", "drivers")]
    assert not bad, bad


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The storelink modules `name` imports, deferred (function-level) and TYPE_CHECKING imports included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def test_no_import_cycles() -> None:
    """Deferred and TYPE_CHECKING imports count: a cycle hidden behind one is still a cycle in the design.

    A package's __init__ importing its own submodules is not a cycle (Python imports the package first)."""
    mods = _modules()
    graph = {n: {m for m in _imports(n, p, set(mods)) if not m.startswith(n + ".")} for n, p in mods.items()}
    # A submodule importing its own package's __init__ for a name is fine only if __init__ imports nothing back.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m):], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
