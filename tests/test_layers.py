"""The import graph of ``src/structenv`` follows the layers drawn in docs/design.md.

Every import of a structenv module by another (module level or inside a function) is read from
the source with :mod:`ast`. An import may point to the same layer or a lower one, never up;
the core (exec, tools, executor, agent) never imports an edge (``sandbox``, ``backends``); and
no runtime import closes a circle (imports under ``if TYPE_CHECKING:`` are type-only and are
left out of the circle check, not of the layer check).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import pathlib

import structenv

ROOT = pathlib.Path(structenv.__file__).parent

#: Lowest first; the same list, drawn, is in docs/design.md ("Layers").
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "structenv._types",
            "structenv._spec",
            "structenv._exceptions",
            "structenv._config",
            "structenv._wakeup",
            "structenv._http",
            "structenv._image",
            "structenv._emergency",
            "structenv._runner",
            "structenv._main",
            "structenv._logging",
            "structenv._process",
            "structenv._viewer",
            "structenv._abc",
            "structenv.abc",
        ),
    ),
    ("sandbox", ("structenv.sandbox", "structenv.sandbox.*")),
    ("backends", ("structenv.backends", "structenv.backends.*")),
    ("exec", ("structenv._batcher", "structenv._pool", "structenv._exec")),
    ("tools", ("structenv.tools", "structenv.tools.*")),
    ("executor", ("structenv._executor",)),
    ("agent", ("structenv.agent", "structenv.agent.*")),
    ("testing", ("structenv.testing", "structenv.testing.*")),
    ("adapters", ("structenv.adapters", "structenv.adapters.*")),
    (
        "apps",
        (
            "structenv",
            "structenv.__main__",
            "structenv.examples",
            "structenv.examples.*",
            "structenv._bench",
            "structenv._bench.*",
            "structenv._cli",
            "structenv._demo",
            "structenv._doctor",
            "structenv._reap",
        ),
    ),
]
CORE = {"exec", "tools", "executor", "agent"}
EDGES = {"sandbox", "backends"}
#: Modules that must not import an event loop directly (the seam is ``_wakeup``).
LOOP_NEUTRAL = ("structenv._batcher", "structenv._pool", "structenv._exec", "structenv._executor")


@functools.cache
def modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found: dict[str, tuple[pathlib.Path, bool]] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        found[".".join(parts)] = (path, is_pkg)
    return found


@functools.cache
def parsed(name: str) -> ast.Module:
    path, _ = modules()[name]
    return ast.parse(path.read_text(), str(path))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


@functools.cache
def imports() -> dict[str, dict[str, bool]]:
    """module -> {imported structenv module: runtime (False if only under TYPE_CHECKING)}."""
    mods = modules()
    graph: dict[str, dict[str, bool]] = {}
    for name, (_, is_pkg) in mods.items():
        tree = parsed(name)
        type_only = _type_checking_nodes(tree)
        out: dict[str, bool] = {}

        def add(
            target: str,
            node: ast.AST,
            out: dict[str, bool] = out,
            name: str = name,
            type_only: set[int] = type_only,
        ) -> None:
            if target == name:
                return
            out[target] = out.get(target, False) or id(node) not in type_only

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                if mod != "structenv" and not mod.startswith("structenv."):
                    continue
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    add(sub if sub in mods else mod, node)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "structenv":
                        add(alias.name, node)
        graph[name] = out
    return graph


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/design.md")


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_imports_point_down() -> None:
    upward = []
    for module, targets in imports().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_the_core_never_imports_an_edge() -> None:
    bad = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if LAYERS[layer_of(module)][0] in CORE and LAYERS[layer_of(target)][0] in EDGES
    ]
    assert not bad, bad


def test_tools_do_not_call_back_into_the_executor() -> None:
    for module, targets in imports().items():
        if module.startswith("structenv.tools"):
            assert not {"structenv._executor", "structenv._exec"} & set(targets), module


def test_no_import_circle() -> None:
    graph = {m: [t for t, runtime in ts.items() if runtime] for m, ts in imports().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_event_loops_are_imported_only_behind_the_seam() -> None:
    for name in LOOP_NEUTRAL:
        tree = parsed(name)
        loops = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level
        }
        assert not loops & {"asyncio", "trio", "sniffio"}, (name, loops)


def test_the_layer_list_is_the_one_in_the_design_doc() -> None:
    design = (ROOT.parent.parent / "docs" / "design.md").read_text()
    drawn = " < ".join(name for name, _ in LAYERS)
    assert drawn in design, f"docs/design.md should state the layer order: {drawn}"


#: Third-party edges and the only modules that may import them (docs/design.md, STYLE.md).
EDGE_LIBRARIES = {
    "atroposlib": ("structenv.adapters.atropos*",),
    "docker": ("structenv.backends._docker*", "structenv.backends._images"),
    "modal": ("structenv.backends._modal",),
    # the backend's actor code, and the bench that starts a local cluster of its own
    "ray": ("structenv.backends._ray_node", "structenv._bench.ray"),
}


def test_edge_libraries_have_one_importer() -> None:
    bad = []
    for name in modules():
        for node in ast.walk(parsed(name)):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            for root in roots & EDGE_LIBRARIES.keys():
                if not any(fnmatch.fnmatchcase(name, p) for p in EDGE_LIBRARIES[root]):
                    bad.append(f"{name} imports {root}")
    assert not bad, bad


def test_no_task_or_thread_outside_a_scope() -> None:
    """Design invariant 3: no ``asyncio.create_task``/``ensure_future``/``run_in_executor``
    and no bare thread anywhere in ``src``."""
    bad = []
    for name in modules():
        for node in ast.walk(parsed(name)):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            last = func.rsplit(".", 1)[-1]
            if last in ("create_task", "ensure_future", "run_in_executor", "Thread"):
                bad.append(f"{name}:{node.lineno}: {func}(...)")
    assert not bad, bad


def test_blocking_calls_have_a_limiter() -> None:
    """Invariant 3 (docs/design.md): every ``anyio.to_thread.run_sync`` in ``src`` passes a
    dedicated ``limiter=``; anyio's default limiter is one pool of 40 threads shared by
    everything in the process, so one subsystem's slow calls would starve another's. A bare
    reference (an alias such as ``run = anyio.to_thread.run_sync``) counts as a call without
    one, and so does ``from anyio.to_thread import run_sync``."""
    bad = []
    for name in sorted(modules()):
        tree = parsed(name)
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "anyio.to_thread":
                bad.append(f"{name}:{node.lineno}: import the module, not run_sync")
            if not (
                isinstance(node, ast.Attribute)
                and node.attr == "run_sync"
                and ast.unparse(node.value).endswith("to_thread")
            ):
                continue
            call = calls.get(id(node))
            if call is None or not any(k.arg == "limiter" for k in call.keywords):
                bad.append(f"{name}:{node.lineno}: {ast.unparse(node)} without limiter=")
    assert not bad, "blocking calls without a dedicated CapacityLimiter:\n" + "\n".join(bad)
