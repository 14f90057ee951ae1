"""The code's shape: modules a newcomer reads in one sitting, functions that fit on a screen, and
dependencies that point one way (dags → orchestration → pipeline → batch → stages → state).

Measured on the source with ``ast``; a failure names the module or function and its size.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [ROOT / "include", ROOT / "plugins", ROOT / "dags"]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# declarative tables: a route table, provider metadata, table definitions
DECLARATIVE = {"create_app", "get_provider_info", "state_tables"}

# the sync library's layers: a module imports only modules of a lower layer
LAYERS = {
    "reasons": 0,
    "normalise": 0,
    "outcomes": 1,
    "fields": 1,
    "config": 2,
    "migrations": 2,
    "keyed": 2,
    "testing": 3,
    "state": 3,
    "warehouse": 3,
    "extract": 4,
    "diff": 4,
    "mapping": 4,
    "upsert": 4,
    "demo": 4,
    "data_docs": 4,
    "retention": 4,
    "failures": 4,
    "quota": 4,
    "checks": 5,
    "identity": 5,
    "verify": 5,
    "batch": 6,
    "winners": 6,
    "pipeline": 7,
    "alerts": 7,
    "deletes": 7,
    "routing": 7,
    "orchestration": 8,
    "operator_view": 8,
    "fleet": 8,
    "__main__": 9,
    "__init__": 9,
}
SYNC = ROOT / "include" / "growthhub_sync"


def _product_files() -> list[Path]:
    return sorted(p for root in PRODUCT for p in root.rglob("*.py"))


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_product_module_is_over_600_lines() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in _product_files()}
    assert {str(p): n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_product_function_is_over_80_lines() -> None:
    long = {}
    for path in _product_files():
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1  # type: ignore[operator]
            if lines > MAX_FUNCTION_LINES and fn.name not in DECLARATIVE:
                long[f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"] = lines
    assert long == {}


def _sync_imports(path: Path) -> set[str]:
    """growthhub_sync modules ``path`` imports, at run time or for type checking."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "growthhub_sync":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("growthhub_sync."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("growthhub_sync."))
    return found


def test_every_sync_module_has_a_layer() -> None:
    assert sorted(p.stem for p in SYNC.glob("*.py")) == sorted(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_sync_modules_import_only_lower_layers(module: str) -> None:
    upward = {m: LAYERS[m] for m in _sync_imports(SYNC / f"{module}.py") if LAYERS[m] >= LAYERS[module]}
    assert upward == {}, f"{module} (layer {LAYERS[module]}) imports from its own layer or above"


def test_no_stage_imports_the_pipeline_or_the_batch_flow() -> None:
    for path in SYNC.glob("*.py"):
        if LAYERS[path.stem] < LAYERS["batch"]:
            assert not _sync_imports(path) & {"pipeline", "batch", "orchestration"}, path.name


def test_the_library_imports_without_airflow() -> None:
    """Airflow glue (connections, notifiers, context) is imported only where it is used."""
    library = ["config", "extract", "mapping", "checks", "diff", "state", "identity", "batch", "pipeline"]
    code = (
        "import sys\n"
        + "".join(f"import growthhub_sync.{m}\n" for m in library)
        + "print(sorted({m.split('.')[0] for m in sys.modules} & {'airflow', 'great_expectations'}))\n"
        + "print('growthhub_sync.alerts' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "False"]
