"""The package's import graph has no cycle, counting the imports inside functions too: a reader can follow
data → models → CARB → train → evals without meeting a module that reaches back."""
import ast
import os

from conftest import REPO


def _import_graph() -> dict[str, set[str]]:
    root = os.path.join(REPO, 'sce_mae_jax')
    modules = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith('.py'):
                name = os.path.relpath(os.path.join(folder, f), REPO)[:-3].replace(os.sep, '.')
                modules[name.removesuffix('.__init__')] = os.path.join(folder, f)
    graph = {}
    for name, path in modules.items():
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # every import, at module level or inside a function
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('sce_mae_jax'):
                for alias in node.names:  # `from pkg import module` names a module, `from module import f` not
                    full = f'{node.module}.{alias.name}'
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith('sce_mae_jax'))
        # the package's __init__ only re-exports Landmarker lazily; importing it is not a dependency on a module
        graph[name] = {d for d in deps if d in modules and d not in (name, 'sce_mae_jax')}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycle_in_the_package():
    graph = _import_graph()
    assert 'sce_mae_jax.evals.metrics' in graph and 'sce_mae_jax.train.common' in graph
    assert _cycles(graph) == []


def test_metrics_import_no_evaluation():
    """Every reported number is computed in evals/metrics.py, which the jobs and figures import, never back."""
    assert not {d for d in _import_graph()['sce_mae_jax.evals.metrics'] if d.startswith('sce_mae_jax.evals.')}
