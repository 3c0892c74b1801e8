"""The package layering of docs/architecture.md ("Layering"), checked on the source.

Every module of ``src/olavlm`` is parsed (no import is executed); every ``import`` / ``from ...
import`` it contains -- module level, inside functions, under ``if`` -- is resolved to an olavlm
module and must point to the importer's own unit, to a unit on a LOWER floor, or (on a floor
marked ``peers``) to another unit of the same floor. A failure names each import that goes up.

A *unit* is a dotted name below ``olavlm`` (``data``, ``geometry``, ``world``); a module belongs to
the unit with the longest matching prefix. Each package's ``cli.py`` (a command adapter that wires
packages together) belongs to the top floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "olavlm"

# The ShapeWorld generator (a leaf the oracle teachers import) and the demo application (top floor).
WORLD = ("world",)
DEMO = ("demo", "methods")

# (floor name, units, units of this floor may import each other), lowest floor first
FLOORS: list[tuple[str, tuple[str, ...], bool]] = [
    ("foundations", ("constants", "errors"), False),
    ("weight-free facts", ("geometry", "dtypes", "threads", "cli_groups"), False),
    ("config", ("config", "config_parsing", "config_checks"), True),
    ("world", WORLD, True),
    ("data, objectives", ("data", "objectives"), False),
    ("model", ("model",), False),
    ("teachers", ("teachers",), False),  # the targets precompute sizes its work with the model's facts
    ("services", ("train", "infer", "evaluation", "interop", "plan", "preflight"), True),
    ("tools", ("prepare", "devkit"), False),
    ("demo app", DEMO, True),
    ("cli", ("cli", "preflight_cli", "*.cli"), True),
]


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> tuple[int, str] | None:
    """(floor index, unit) of an ``olavlm.*`` module, by the longest matching unit prefix."""
    rel = module.removeprefix("olavlm.")
    if module.startswith("olavlm.") and rel.split(".")[-1] == "cli" and "." in rel:
        return len(FLOORS) - 1, "*.cli"
    best = None
    for floor, (_, units, _) in enumerate(FLOORS):
        for unit in units:
            if (rel == unit or rel.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (floor, unit)
    return best


def imports_of(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, olavlm module) of every import in the file, at any depth."""
    module = module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from olavlm.world import text` imports the module olavlm.world.text
                sub = src.parent.joinpath(*target.split("."), a.name)
                is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                found.append((node.lineno, f"{target}.{a.name}" if is_module else target))
    return sorted({(line, name) for line, name in found if name == "olavlm" or name.startswith("olavlm.")})


def violations(src: Path = SRC) -> tuple[list[str], list[str]]:
    """(imports that go up, modules that belong to no floor)."""
    up, unplaced = [], []
    for path in sorted(src.rglob("*.py")):
        module = module_name(path, src)
        if module == "olavlm":
            continue
        here = unit_of(module)
        if here is None:
            unplaced.append(module)
            continue
        for line, target in imports_of(path, src):
            there = unit_of(target)
            if target == "olavlm" or there is None or there[1] == here[1]:
                continue  # the package root, an unplaced module (reported above) or its own unit
            peers = FLOORS[here[0]][2] and there[0] == here[0]
            if there[0] > here[0] or (there[0] == here[0] and not peers):
                up.append(f"{path.relative_to(src.parent)}:{line}: {module} (floor {FLOORS[here[0]][0]!r}) "
                          f"imports {target} (floor {FLOORS[there[0]][0]!r})")
    return up, unplaced


def test_every_module_is_on_a_floor():
    _, unplaced = violations()
    assert not unplaced, "modules missing from FLOORS (add them to the layering): " + ", ".join(unplaced)


def test_no_import_goes_up():
    up, _ = violations()
    assert not up, "imports that go up the layering:\n" + "\n".join(up)


def test_checker_catches_an_upward_import_at_any_depth(tmp_path):
    """The checker itself: a function-local import from data into train, and a relative import
    between two same-floor units that are not peers, are reported with their line; imports of a
    lower floor and of the module's own package are not."""
    pkg = tmp_path / "olavlm"
    (pkg / "data").mkdir(parents=True)
    (pkg / "model").mkdir()
    (pkg / "objectives.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "data" / "x.py").write_text("from olavlm.errors import UserError\n\n"
                                       "def f():\n    if True:\n        from olavlm.train import loop\n")
    (pkg / "data" / "y.py").write_text("from .. import errors\nimport olavlm.geometry\n")
    (pkg / "model" / "z.py").write_text("from olavlm.data import x\nfrom . import z\n")
    up, unplaced = violations(pkg)
    assert not unplaced
    assert len(up) == 1 and up[0].startswith("olavlm/data/x.py:5: olavlm.data.x") and "olavlm.train" in up[0], up
    (pkg / "data" / "y.py").write_text("import olavlm.geometry\nfrom .. import objectives\n")  # same floor, not peers
    up, _ = violations(pkg)
    assert len(up) == 2 and any("y.py:2" in u and "imports olavlm.objectives" in u for u in up), up


@pytest.mark.parametrize("module,floor", [("olavlm.data.cli", "cli"), ("olavlm.geometry", "weight-free facts"),
                                          ("olavlm.world.generate", "world"), ("olavlm.demo.run", "demo app")])
def test_units_resolve_by_longest_prefix(module, floor):
    assert FLOORS[unit_of(module)[0]][0] == floor


MAX_FUNCTION_LINES = 80  # "functions under ~80 lines" (DESIGN.md); a longer one is split into named steps


def long_functions(src: Path = SRC, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` of every function or method longer than ``limit`` lines."""
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(src.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    assert not long_functions(), "functions over 80 lines:\n" + "\n".join(long_functions())


def test_long_function_check_counts_decorators_out_and_bodies_in(tmp_path):
    pkg = tmp_path / "olavlm"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    (pkg / "m.py").write_text(f"@staticmethod\ndef ok():\n{body[:-len('    x79 = 79')-1]}\n"
                              f"class C:\n    def long(self):\n{body.replace('    x', '        x')}")
    assert long_functions(pkg) == ["olavlm/m.py:84 long (81 lines)"]
