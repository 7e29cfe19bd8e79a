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


def test_the_core_knows_nothing_of_http():
    """router.core imports neither the web stack nor anything of router.http."""
    for path in _sources("router/core"):
        for imported in _imports(path):
            assert _top(imported) not in {"aiohttp", "pydantic"}, f"{path.relative_to(REPO)} imports {imported}"
            assert not imported.startswith("router.http"), f"{path.relative_to(REPO)} imports {imported}"


def test_no_import_cycles_in_the_router():
    """Imports between the router's own modules (at any level, in functions too) form no cycle."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in _sources("router")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])
