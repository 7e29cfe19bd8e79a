"""The import rules of DESIGN.md section 8, checked on the source."""

import ast
from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def test_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts, checked by import-linter: router, shard and
    launcher never cross; router.core knows nothing of HTTP; no import cycle among the router's
    modules and packages; one module on each side touches the generated protocol buffers."""
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_scheduling_core_is_pure_standard_library():
    allowed_own = {
        "router.core.block_pool",
        "router.core.kv_cache_manager",
        "router.core.request",
        "router.core.scheduler",
        "router.core.step_cost",
    }
    for name in ("scheduler.py", "kv_cache_manager.py", "block_pool.py", "request.py", "step_cost.py"):
        for imported in _imports(REPO / "router" / "core" / name):
            if imported.startswith("router"):
                assert imported in allowed_own, f"router/core/{name} imports {imported}"
            else:
                assert _top(imported) in {"collections", "dataclasses", "enum", "hashlib"}, (
                    f"router/core/{name} imports {imported}"
                )
