"""The import rule of docs/architecture.md, checked on the source: a module
imports only its own layer and the layers below, and every project import sits at the top
of its module (none hidden in a function, where a loop between modules would go unseen)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "orchestrator", "ensemble", "jobs")

# Lowest first. Each folder of orchestrator/ and ensemble/ is one layer and says so in its
# package docstring ("Layer N, <name>: ..."); a module belongs to the layer of its longest
# prefix. ensemble/'s own modules are its command lines.
LAYERS = [
    ("foundations", ["models", "orchestrator.base", "orchestrator.data"]),
    ("the Ray-free core", ["orchestrator.config", "orchestrator.train", "orchestrator.records", "orchestrator.planning",
                           "ensemble.core"]),
    ("what users see", ["orchestrator.views", "ensemble.views"]),
    ("members on Ray", ["orchestrator.runtime"]),
    ("job drivers", ["orchestrator.drivers"]),
    ("entry points", ["jobs", "ensemble"]),
]


def layer_of(module: str) -> int:
    if module == "orchestrator":  # the namespace's empty __init__
        return 0
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return found


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def project_imports(tree: ast.Module, module: str):
    """(imported project module, line, inside a function?) for every runtime import."""
    def walk(node, in_function, in_type_checking):
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = in_type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import) and not tc:
                for alias in child.names:
                    yield alias.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom) and not tc:
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".")[: -child.level] if not module_is_pkg(module) else module.split(".")
                    base = ".".join(pkg + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    yield (full if full in ALL else base), child.lineno, in_function
            yield from walk(child, fn, tc)

    for name, line, in_function in walk(tree, False, False):
        if name.split(".")[0] in PACKAGES:
            yield name, line, in_function


ALL = modules()


def module_is_pkg(module: str) -> bool:
    return ALL[module].name == "__init__.py"


def violations() -> tuple[list[str], list[str]]:
    upward, hidden = [], []
    for module, path in ALL.items():
        tree = ast.parse(path.read_text(), str(path))
        mine = layer_of(module)
        for target, line, in_function in project_imports(tree, module):
            where = f"{path.relative_to(ROOT)}:{line}"
            if in_function:
                hidden.append(f"{where}: {module} imports {target} inside a function")
            if layer_of(target) > mine:
                upward.append(f"{where}: {module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    return upward, hidden


def test_no_module_imports_a_higher_layer():
    upward, _ = violations()
    assert not upward, "\n".join(upward)


def test_no_project_import_is_hidden_in_a_function():
    _, hidden = violations()
    assert not hidden, "\n".join(hidden)


def test_the_rule_catches_an_upward_and_a_hidden_import():
    tree = ast.parse("import os\nfrom orchestrator.runtime import launch\ndef f():\n    from models import get_spec\n")
    found = list(project_imports(tree, "orchestrator.data.dataset"))
    assert found == [("orchestrator.runtime.launch", 2, False), ("models", 4, True)]
    assert layer_of("orchestrator.runtime.launch") > layer_of("orchestrator.data.dataset")


def test_no_module_is_over_300_lines():
    long = {m: n for m, path in ALL.items() if (n := len(path.read_text().splitlines())) > 300}
    assert not long, f"split these by concern: {long}"


@pytest.mark.parametrize("package, loose_allowed", [("orchestrator", set()), ("ensemble", {"evaluate.py", "predict.py"})])
def test_a_package_is_one_folder_per_layer_each_saying_which(package, loose_allowed):
    loose = {p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"}
    assert loose == loose_allowed, f"modules beside the layer folders: {loose - loose_allowed}"
    assert all(layer_of(f"{package}.{p[:-3]}") == len(LAYERS) - 1 for p in loose), "only command lines stay loose"
    for folder in sorted(p for p in (ROOT / package).iterdir() if p.is_dir() and p.name != "__pycache__"):
        module = f"{package}.{folder.name}"
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        layer = layer_of(module)
        assert doc.startswith(f"Layer {layer}, {LAYERS[layer][0]}"), f"{module}: {doc[:60]!r}"
        assert all(layer_of(m) == layer for m in ALL if m.startswith(module + ".")), module
