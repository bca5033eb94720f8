"""The teaching layout: the README's reading order agrees with the imports and with every file's
"Read next" line, and the core stays small (function length, complexity, total lines)."""
import ast
import re

import pytest
from conftest import ROOT

CORE = ["model.py", "aligner.py", "train.py", "generate.py"]


def reading_order():
    """The top-level .py files in the order the README's "Reading order" section names them."""
    section = (ROOT / "README.md").read_text().split("## Reading order", 1)[1].split("\n## ", 1)[0]
    names = []
    for name in re.findall(r"`([a-z_]+\.py)`", section):
        if (ROOT / name).is_file() and name not in names:
            names.append(name)
    return names


def local_imports(name):
    tree = ast.parse((ROOT / name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return {f"{m}.py" for m in found if (ROOT / f"{m}.py").is_file()}


def test_reading_order_covers_every_top_level_file():
    assert sorted(reading_order()) == sorted(p.name for p in ROOT.glob("*.py"))


def test_no_file_imports_one_that_comes_later():
    order = reading_order()
    for i, name in enumerate(order):
        later = local_imports(name) & set(order[i + 1:])
        assert not later, f"{name} imports {later}, which the README's reading order puts after it"


def test_read_next_names_the_next_file():
    order = reading_order()
    for name, following in zip(order, order[1:]):
        doc = ast.get_docstring(ast.parse((ROOT / name).read_text()))
        assert doc, f"{name} has no docstring"
        read_next = re.search(r"Read next: (.*)", doc, re.S)
        assert read_next, f"{name}'s docstring has no 'Read next' line"
        first = re.search(r"[a-z_]+\.py|README\.md", read_next.group(1)).group(0)
        assert first == following, f"{name} says read {first} next; the README says {following}"


def functions():
    for name in sorted(p.name for p in ROOT.glob("*.py")):
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_functions_are_short():
    long = [f"{name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)" for name, f in functions()
            if f.end_lineno - f.lineno + 1 > 60]
    assert not long


def test_complexity_at_most_15():
    radon = pytest.importorskip("radon.complexity")
    worst = [f"{p.name}: {b.name} {b.complexity}" for p in ROOT.glob("*.py")
             for b in radon.cc_visit(p.read_text()) if b.complexity > 15]
    assert not worst


def test_core_size():
    lines = {name: (ROOT / name).read_text().splitlines() for name in CORE}
    assert sum(map(len, lines.values())) <= 1150, {n: len(v) for n, v in lines.items()}
    wide = [f"{n}:{i + 1}" for n, v in lines.items() for i, line in enumerate(v) if len(line) > 110]
    assert not wide
