"""The import rules of DESIGN.md section 8, checked on the source."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources(package: str):
    return [p for p in (REPO / package).rglob("*.py") if "/pb/" not in p.as_posix()]


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("router", {"shard", "torch", "triton", "transformers"}),
        ("shard", {"router", "aiohttp"}),
        ("launcher", {"router", "shard", "torch", "triton", "transformers", "grpc"}),
    ],
)
def test_packages_do_not_cross(package, forbidden):
    for path in _sources(package):
        bad = {n for n in _imports(path) if _top(n) in forbidden}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("package", ["router", "shard"])
def test_only_one_module_per_side_touches_pb(package):
    users = {p.name for p in _sources(package) if any(".pb" in n for n in _imports(p))}
    assert users == {"shard_client.py" if package == "router" else "server.py"}


def test_scheduling_core_is_pure_standard_library():
    allowed_own = {"router.core.block_manager", "router.core.request", "router.core.scheduler", "router.core.step_cost"}
    for name in ("scheduler.py", "block_manager.py", "request.py", "step_cost.py"):
        for imported in _imports(REPO / "router" / "core" / name):
            if imported.startswith("router"):
                assert imported in allowed_own, f"router/core/{name} imports {imported}"
            else:
                assert _top(imported) in {"collections", "dataclasses", "enum", "hashlib"}, (
                    f"router/core/{name} imports {imported}"
                )


HTTP_MODULES = {"aiohttp", "pydantic"}


def test_the_core_knows_nothing_of_http():
    """router.core imports neither the web stack nor the router's HTTP modules."""
    http_side = {p.stem for p in (REPO / "router").glob("*.py")} - {
        "__init__", "__main__", "metrics", "shard_client", "tokenizer", "tracing", "config", "limits"
    }  # fmt: skip
    for path in _sources("router/core"):
        for imported in _imports(path):
            assert _top(imported) not in HTTP_MODULES, f"{path.relative_to(REPO)} imports {imported}"
            parts = imported.split(".")
            assert not (parts[0] == "router" and len(parts) > 1 and parts[1] in http_side), (
                f"{path.relative_to(REPO)} imports {imported}, an HTTP-side module"
            )
