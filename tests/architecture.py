"""The checker of docs/architecture.md's structure, drawn from the imports: every import of the tree (lazy ones
and `importlib.import_module` by name included) goes down the layers or sideways where the document allows it, and
no files and no packages import each other in a cycle. tests/test_architecture.py runs it on the tree and on small
trees of its own.

`python tests/architecture.py` prints what is wrong, one problem a line.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The layers of docs/architecture.md, top first. A unit is a package or a module of its own; the longest
# unit a module's name starts with places it. Imports within one unit are free.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entries", ("handler", "serve_handler", "worker.cli", "worker.devtools")),
    ("orchestrator", ("worker.job",)),
    ("stages", ("worker.checks", "worker.publish", "worker.train", "worker.serve")),
    ("stage libraries", ("worker.estimate", "worker.data")),
    ("foundation", ("worker.errors", "worker.events", "worker.lifeline", "worker.documents")),
    # `worker` itself (its __init__, a namespace of units) holds nothing, so anything may import it
    ("contracts", ("schemas", "ftw_kernels", "worker")),
)
NAMESPACES = frozenset({"worker"})  # units that place only themselves, not the modules inside them
# the sideways imports the document names: (importer, imported)
SIDEWAYS = frozenset(
    {
        ("worker.serve", "worker.publish"),  # the serving worker pulls adapters
        ("worker.estimate", "worker.data"),  # the prepared data's contract
        ("worker.cli", "worker.devtools"),  # `ftw endpoint`, `ftw submit`, ...: subcommands of the one CLI
        ("worker.events", "worker.errors"),  # a child's failure travels as the error taxonomy's record
        ("worker.documents", "worker.errors"),  # reading a config or job file ends in an Outcome
        ("worker.train", "worker.serve"),  # RL generation through the serving worker's vLLM engine process
    }
)
# units only some units may import
ONLY_IMPORTED_BY = {"ftw_kernels": frozenset({"worker.train"})}
# what is read, and each folder's import name (kernels/ is imported as ftw_kernels: `kernels` is Hugging Face's)
SOURCES = {
    "handler.py": "handler",
    "serve_handler.py": "serve_handler",
    "schemas": "schemas",
    "worker": "worker",
    "kernels/ftw_kernels": "ftw_kernels",
}
HF_KERNELS = "kernels"
LAYER_OF = {unit: (rank, name) for rank, (name, units) in enumerate(LAYERS) for unit in units}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    where: str  # file:line
    how: str = ""  # "", "lazy", "type-checking only" or "by name" (importlib.import_module)

    def __str__(self) -> str:
        return f"{self.source} imports {self.target} at {self.where}" + (f" ({self.how})" if self.how else "")


def modules_of(root: Path) -> dict[str, Module]:
    """Every module of the tree under its import name."""
    found: dict[str, Module] = {}
    for source, name in SOURCES.items():
        path = root / source
        if path.is_file():
            found[name] = Module(name, path, False)
        for file in sorted(path.rglob("*.py")) if path.is_dir() else ():
            parts = [name, *file.relative_to(path).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            found[module] = Module(module, file, is_package)
    return found


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        unit = ".".join(parts[:n])
        if unit in LAYER_OF and (unit == module or unit not in NAMESPACES):
            return unit
    return None


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST, how: str = "") -> Iterator[tuple[ast.AST, str]]:
    """Every node, with "lazy" where it runs only when a function is called, "type-checking only" under
    `if TYPE_CHECKING:` (such an import still ties the two modules together, so it counts)."""
    for node in ast.iter_child_nodes(tree):
        yield node, how
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _statements(node, how or "lazy")
        elif _type_checking(node):
            assert isinstance(node, ast.If)
            for child in node.body:
                yield child, "type-checking only"
                yield from _statements(child, "type-checking only")
            for child in node.orelse:
                yield child, how
                yield from _statements(child, how)
        else:
            yield from _statements(node, how)


def _resolve(name: str, modules: dict[str, Module]) -> str | None:
    """The longest module of the tree that `name` names or lies in."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _targets(node: ast.AST, module: Module, modules: dict[str, Module]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.name.split(".")
        package = package if module.is_package else package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([node.module] if node.module else [])])
    # `from pkg import name` imports the module pkg.name where there is one, else pkg
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def imports_of(module: Module, modules: dict[str, Module], root: Path) -> tuple[list[Import], list[str]]:
    """The imports of one file that reach the tree, and its imports of Hugging Face's `kernels`."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
    file = module.path.relative_to(root).as_posix()
    found: list[Import] = []
    hf_kernels: list[str] = []
    by_name = any(  # importlib.import_module(...) here: a string naming a module of the tree is an import
        (isinstance(node, ast.Attribute) and node.attr == "import_module")
        or (isinstance(node, ast.Name) and node.id == "import_module")
        for node in ast.walk(tree)
    )
    for node, how in _statements(tree):
        names = _targets(node, module, modules)
        if by_name and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            names, how = [node.value], "by name"
        for name in dict.fromkeys(names):  # `from pkg import a, b` imports pkg once
            where = f"{file}:{getattr(node, 'lineno', 0)}"
            if name.split(".")[0] == HF_KERNELS:
                hf_kernels.append(
                    f"{module.name} imports {name} at {where}: `{HF_KERNELS}` is Hugging Face's package; "
                    "ours (the kernels/ folder) is ftw_kernels"
                )
            target = _resolve(name, modules)
            if target is not None and target != module.name:
                found.append(Import(module.name, target, where, how))
    return found, hf_kernels


def layer_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        source, target = unit_of(imp.source), unit_of(imp.target)
        if source is None or target is None or source == target:
            continue
        (rank_s, layer_s), (rank_t, layer_t) = LAYER_OF[source], LAYER_OF[target]
        allowed_by = ONLY_IMPORTED_BY.get(target)
        if rank_t < rank_s:
            problems.append(f"up a layer ({layer_s} -> {layer_t}): {imp}")
        elif rank_t == rank_s and (source, target) not in SIDEWAYS:
            problems.append(f"sideways within {layer_s}, not allowed by docs/architecture.md: {imp}")
        elif allowed_by is not None and source not in allowed_by:
            problems.append(f"only {', '.join(sorted(allowed_by))} may import {target}: {imp}")
    return problems


def _cycle_through(start: str, edges: dict[str, dict[str, Import]], group: set[str]) -> list[str]:
    """A shortest cycle from `start` back to it inside its strongly connected group."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges.get(node, {})):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt in group and nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in no cycle")


def _groups(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Strongly connected groups of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
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
                    group: set[str] = set()
                    while node not in group:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def cycle_problems(edges: dict[str, dict[str, Import]], kind: str) -> list[str]:
    problems = []
    for group in sorted(_groups(edges), key=min):
        cycle = _cycle_through(min(group), edges, group)
        hops = "".join(f"\n    {edges[a][b]}" for a, b in zip(cycle, cycle[1:]))
        rest = f" ({len(group)} {kind}s import each other in all: {', '.join(sorted(group))})" if len(group) > 2 else ""
        problems.append(f"{kind} cycle: {' -> '.join(cycle)}{rest}{hops}")
    return problems


def problems(root: Path) -> list[str]:
    """Everything in the tree under `root` that docs/architecture.md does not allow, one readable line each."""
    modules = modules_of(root)
    imports: list[Import] = []
    found = [
        f"in no layer of docs/architecture.md: {m.name} ({m.path.relative_to(root).as_posix()})"
        for m in modules.values()
        if unit_of(m.name) is None
    ]
    for module in modules.values():
        reached, hf_kernels = imports_of(module, modules, root)
        imports += reached
        found += hf_kernels
    found += layer_problems(imports)
    files: dict[str, dict[str, Import]] = {}
    units: dict[str, dict[str, Import]] = {}
    for imp in imports:
        files.setdefault(imp.source, {}).setdefault(imp.target, imp)
        source, target = unit_of(imp.source), unit_of(imp.target)
        if source and target and source != target:
            units.setdefault(source, {}).setdefault(target, imp)
    return found + cycle_problems(files, "file") + cycle_problems(units, "package")


if __name__ == "__main__":
    print("\n".join(problems(REPO)) or "no problems")
    sys.exit(0)
