"""No import cycles between the source modules: the graph of module-level imports (not those inside functions,
nor under `if TYPE_CHECKING:`) must be acyclic, so every module can be imported first."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "draft_service", "verifier_service", "gateway", "scripts", "bench")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the source packages (a package is its __init__.py)."""
    modules = {}
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module):
    """The Import/ImportFrom nodes that run when the module is imported: not in functions or TYPE_CHECKING."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo += node.orelse
        else:
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt | ast.excepthandler)]


def _with_parents(name: str, modules) -> set[str]:
    """Importing a.b.c runs a, a.b and a.b.c: each one that is ours."""
    parts = name.split(".")
    return {p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in modules}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= _with_parents(alias.name, modules)
                continue
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            edges |= _with_parents(base, modules)
            for alias in node.names:                      # `from pkg import sub` imports the submodule
                if f"{base}.{alias.name}" in modules:
                    edges.add(f"{base}.{alias.name}")
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(set(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_walk_sees_the_packages_and_their_imports():
    graph = import_graph()
    assert {"common.rpc.server", "gateway.auth", "scripts.cli", "bench"} <= graph.keys()
    assert "common.rpc.admission" in graph["common.rpc.server"]
    assert "common.models.errors" in graph["common.models.fetch"]


def test_the_cycle_finder_reports_a_cycle_and_ignores_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_imports_inside_functions_and_type_checking_do_not_count():
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n"
                     "try:\n    import z\nexcept ImportError:\n    import w\nclass C:\n    import v\n")
    names = {a.name for node in module_level_imports(tree) for a in node.names}
    assert names == {"os", "z", "w", "v"}


def test_no_import_cycles_between_source_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)
