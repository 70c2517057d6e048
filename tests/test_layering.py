"""Dependencies point one way (ARCHITECTURE.md): cli, api -> engine -> {scheduler, models, kvcache} ->
{memory, kernels}. No module of the engine or below imports from api or cli, api does not import cli, and the API
reads the AsyncEngine, never the Engine behind it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tailorkv"
BELOW = ("engine", "scheduler", "kvcache", "memory", "models", "kernels", "distributed")
FORBIDDEN = {**{part: ("api", "cli") for part in BELOW}, "api": ("cli",)}


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`, e.g. "tailorkv.engine.engine") imports, anywhere in it,
    as absolute dotted names."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` that point upward."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in FORBIDDEN:
        return []
    above = [f"tailorkv.{name}" for name in FORBIDDEN[parts[1]]]
    return sorted(
        name
        for name in imported_modules(source, module, is_package)
        if any(name == a or name.startswith(a + ".") for a in above)
    )


def test_the_detector_flags_upward_imports():
    bad = (
        "import tailorkv.cli\n"
        "def f():\n"
        "    from ..api.server import serve\n"
        "    from .. import cli\n"
        "    from ..cli import engine_config\n"
    )
    assert violations(bad, "tailorkv.engine.calibration") == [
        "tailorkv.api.server",
        "tailorkv.api.server.serve",
        "tailorkv.cli",
        "tailorkv.cli.engine_config",
    ]
    assert violations("from .. import cli", "tailorkv.api", is_package=True) == ["tailorkv.cli"]
    assert violations("from . import cli", "tailorkv.api", is_package=True) == []
    assert violations("from ..cli import main", "tailorkv.kernels.kivi") == [
        "tailorkv.cli",
        "tailorkv.cli.main",
    ]
    good = "from ..engine.async_engine import AsyncEngine\nfrom .. import config\n"
    assert violations(good, "tailorkv.api.server") == []
    assert violations("from .cli import main", "tailorkv.__main__") == []


def test_nothing_below_imports_from_above():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        bad = violations(path.read_text(), module, is_package)
        if bad:
            found[module] = bad
    assert found == {}


def reaches_through(source: str) -> list[int]:
    """Lines where `source` reads `<x>.engine.engine` (the Engine behind an AsyncEngine)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr == "engine"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "engine"
    ]


def test_the_api_reads_the_async_engine_only():
    assert reaches_through("from ..engine.engine import Engine\nn = state.engine.model_name") == []
    assert reaches_through("x = 1\nn = state.engine.engine.config.name") == [2]
    found = {
        path.name: lines
        for path in sorted((PACKAGE / "api").glob("*.py"))
        if (lines := reaches_through(path.read_text()))
    }
    assert found == {}
