"""The shape of the code, checked: SQL only in store/, layers that only point down, no import cycles, and code
above store/ using only the store's listed contract. Read from the source files with ast (nothing imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cardq.store import CONTRACT, TYPES

ROOT = Path(__file__).resolve().parent.parent
# Where each package's source lives in the checkout (pyproject's package-dir), and the CLI file.
PACKAGE_DIRS = {"cardq": ROOT / "cardq", "cardq.store": ROOT / "store", "cardq.actors": ROOT / "actors",
                "cardq.web": ROOT / "cardq" / "web"}
CLI_FILE = ROOT / "cli.py"

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, set[str] | str]] = [
    ("errors and config", {"cardq.errors", "cardq.config", "cardq.vocabulary"}),
    ("store", "cardq.store"),
    ("runtime", "*"),  # everything not named elsewhere: supervisor, workers, actors, logs, handlers, inputs, ...
    ("public API", {"cardq", "cardq.api"}),
    ("HTTP", "cardq.web"),  # the HTTP server: over the public API, like the CLI
    ("CLI", {"cardq.cli", "cardq.render", "cardq.demo"}),
]


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.glob("*.py")):
            if path.is_symlink():
                continue  # cardq/cli.py: the link to cli.py, named below
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    out["cardq.cli"] = CLI_FILE
    return out


MODULES = modules()


def layer_of(module: str) -> int:
    for n, (_name, members) in enumerate(LAYERS):
        if isinstance(members, set) and module in members:
            return n
        if isinstance(members, str) and members != "*" and (module == members or module.startswith(members + ".")):
            return n
    return next(n for n, (_name, members) in enumerate(LAYERS) if members == "*")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: annotations only, never executed."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str) -> set[str]:
    """Every cardq module this one imports, at the top or inside a function (a lazy import is a dependency too)."""
    tree = ast.parse(MODULES[module].read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cardq")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cardq":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_only_the_cardq_import_name_is_used():
    # Top-level `store`, `actors` or `cli` would be a second copy of a module (and does not exist once installed).
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] not in ("store", "actors", "cli"), f"{module} imports {name}"


def test_layers_only_point_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
              for m, deps in GRAPH.items() for dep in deps if layer_of(dep) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_sql_outside_store():
    offenders = [f"{m}: line {n}" for m, path in MODULES.items() if not m.startswith("cardq.store")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "execute(" in line]
    assert not offenders, offenders


def test_no_apsw_outside_store():
    # Not in an import and not in a signature: the store's Database and Tx are the only handles above it.
    offenders = [m for m, path in MODULES.items() if not m.startswith("cardq.store")
                 and re.search(r"\bapsw\b", path.read_text())]
    assert not offenders, offenders


def _store_uses(path: Path) -> set[tuple[str, str]]:
    """(store module, name) pairs a file uses: `from cardq.store.X import Y`, and `X.Y` where X names a store
    module it imported (`from cardq.store import X [as Z]`)."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    uses: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "cardq.store":
            for a in node.names:
                if f"cardq.store.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cardq.store."):
            uses.update((node.module.rsplit(".", 1)[1], a.name) for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.add((aliases[node.value.id], node.attr))
    return uses


def test_code_above_the_store_uses_only_its_contract():
    allowed = {(mod, name) for table in (CONTRACT, TYPES) for mod, names in table.items() for name in names}
    outside = [(m, use) for m, path in MODULES.items() if not m.startswith("cardq.store")
               for use in _store_uses(path) if use not in allowed]
    assert not outside, "\n".join(f"{m} uses store.{mod}.{name}, which store/__init__.py does not list"
                                  for m, (mod, name) in outside)


@pytest.mark.parametrize("module", sorted(CONTRACT))
def test_the_contract_names_real_operations_without_sqlite_types(module):
    import importlib
    import inspect

    mod = importlib.import_module(f"cardq.store.{module}")
    for name in (*CONTRACT[module], *TYPES.get(module, ())):
        obj = getattr(mod, name)  # AttributeError: the contract lists something that does not exist
        if inspect.isfunction(obj):
            assert "apsw" not in str(inspect.signature(obj)), f"store.{module}.{name}{inspect.signature(obj)}"
            assert obj.__doc__, f"store.{module}.{name} says nothing of what it guarantees"


def test_public_names_are_not_shadowed_by_submodules():
    # `from cardq import x` where cardq/x.py also exists replaces the function with the module once imported.
    import cardq

    clashes = [name for name in cardq.__all__ if (ROOT / "cardq" / f"{name}.py").exists()]
    assert not clashes, clashes
