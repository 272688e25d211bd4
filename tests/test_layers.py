"""The import structure of src/mixer_cli: no module imports itself back through others, also where a
package's __init__ and its own modules are involved (which import-linter's sibling check does not see)."""
import grimp


def import_circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return circles


def test_no_module_of_the_package_imports_itself_back():
    assert import_circles(grimp.build_graph("mixer_cli", cache_dir=None)) == []


def test_the_circle_finder_finds_a_circle_through_a_package_init():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.data", "pkg.data.shards", "pkg.core"):
        graph.add_module(module)
    graph.add_import(importer="pkg.data", imported="pkg.data.shards")  # data/__init__.py re-exports shards
    graph.add_import(importer="pkg.data.shards", imported="pkg.data")  # shards takes a name from data/__init__
    graph.add_import(importer="pkg.data.shards", imported="pkg.core")
    assert import_circles(graph) == [["pkg.data", "pkg.data.shards"]]
