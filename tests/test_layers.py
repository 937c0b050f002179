"""The package's shape: declared layers without cycles, and a public API whose three lists agree.

Every import of every module is read from the source (function-level and TYPE_CHECKING imports
included, since a lazy import is still a dependency). A module may import from its own layer or a
lower one, never from a higher one, and the import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mpt_tools"

# Bottom to top. A module may import only from its own layer or a lower one.
LAYERS: list[list[str]] = [
    # leaves (hub: the package, imports nothing; paths: opening files to read, without blocking;
    # progress: the bars of long loops, off unless the CLI turns them on; dtypes: their names and aliases)
    ["version", "errors", "interrupts", "paths", "options", "results", "hub", "progress", "dtypes"],
    ["config", "formats", "peft_releases"],  # adapter config and file names, tensor files, PEFT's fields
    ["files"],  # sha256, atomic and staged writes, the output guard
    ["hub.download", "hub.listing"],  # a Hub source into the cache; listings and headers (audit): no checks
    ["checkpoint"],  # a source, loaded
    # findings; factor math (torch's mean in numpy); prompt math; P* recovered from exact prompts and
    # the ALS fit of P* * (U_k V_k) to prompts (pack)
    ["findings", "factors", "torchmean", "prompts", "recover", "als"],
    ["modes"],  # the table of target modes
    ["checks", "hazards", "writer", "hub.base_model", "hub.card", "verification.engine"],  # hazards: serving layouts
    ["hub.push", "verification.target"],
    # the operations
    ["validation", "surgery", "conversion", "compare", "verification", "compat", "audit", "export", "pack"],
    ["inspection", "init", "embed"],  # operations that use other operations (similarity; verify, push)
    ["cli.options", "cli.render"],
    ["cli"],
    ["__main__"],
    [""],  # mpt_tools itself: the lazy public API over everything
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports() -> set[tuple[str, str]]:
    """(importer, imported) for every import of an mpt_tools module by another, anywhere in it."""
    mods = modules()
    edges: set[tuple[str, str]] = set()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    sub = f"{module}.{alias.name}".lstrip(".")
                    targets.append(sub if sub in mods else module)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpt_tools"):
                targets.append(node.module.removeprefix("mpt_tools").lstrip("."))  # type: ignore[union-attr]
            elif isinstance(node, ast.Import):
                targets += [
                    a.name.removeprefix("mpt_tools").lstrip(".") for a in node.names if a.name.startswith("mpt_tools")
                ]
            edges.update((name, t) for t in targets if t != name)
    return edges


def test_every_module_has_a_layer() -> None:
    placed = [m for layer in LAYERS for m in layer]
    assert len(placed) == len(set(placed))
    assert sorted(placed) == sorted(modules()), "add the new module to LAYERS"


def test_no_import_points_up_a_layer() -> None:
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = sorted(f"{a or 'mpt_tools'} -> {b}" for a, b in imports() if rank[b] > rank[a])
    assert not upward, "imports up the declared layers:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in imports():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(m or "mpt_tools" for m in cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The two checks above can fail: the graph they read has the edges they must refuse."""
    edges = imports()
    assert ("init", "verification") in edges  # a function-level import is read
    assert ("modes", "checkpoint") in edges  # a TYPE_CHECKING import is read
    assert ("checkpoint", "hub.download") in edges


def test_public_api_lists_agree() -> None:
    """mpt_tools.__init__: the lazy table, its TYPE_CHECKING mirror and __all__ name the same
    things, and each name is importable from the module the table says."""
    import importlib

    import mpt_tools

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    mirror: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    mirror[alias.asname or alias.name] = (stmt.module or "").lstrip(".")
    where = mpt_tools._WHERE
    assert mirror == where
    assert sorted(mpt_tools.__all__) == sorted([*where, "__version__"])
    for name, module in where.items():
        assert getattr(importlib.import_module(f"mpt_tools.{module}"), name) is getattr(mpt_tools, name)


def test_no_library_function_takes_more_than_8_parameters() -> None:
    """Options travel as objects (SourceSpec, HubOptions, TargetPlan), not as long parameter lists."""
    wide = []
    for name, path in modules().items():
        if name == "cli" or name.startswith("cli."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
                count = len([p for p in params if p.arg not in ("self", "cls")])
                if count > 8:
                    wide.append(f"{name}.{node.name}: {count}")
    assert not wide, wide


def test_no_command_takes_options_as_kwargs() -> None:
    """Every command names its parameters: the option decorators build the option objects, so no
    command pops options out of ``**kwargs``."""
    import inspect

    from mpt_tools.cli import cli

    for name, command in cli.commands.items():
        assert command.callback is not None
        params = inspect.signature(inspect.unwrap(command.callback)).parameters.values()
        assert all(p.kind != p.VAR_KEYWORD for p in params), f"{name} takes **kwargs"
