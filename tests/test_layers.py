"""The import graph keeps the layers of docs/architecture.md: read from the source, so a
shortcut through a sibling command or a private kernel module fails here."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"trace_kernels": ROOT / "trace_kernels", "trace_ft": ROOT / "python" / "trace_ft"}

# trace_ft's packages, lowest first: a package imports only those before it (and itself).
TRACE_FT_LAYERS = ["tasks", "method", "store", "lm", "benchmarks", "evaluate", "continual", "config",
                   "integrations", "commands", "cli"]


def _modules():
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_package: bool) -> set[str]:
    """Absolute names of every module `name` imports (relative imports resolved)."""
    out = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


GRAPH = {name: _imports(name, path, pkg) for name, path, pkg in _modules()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "trace_ft" and len(parts) > 1 else None


def test_trace_kernels_never_imports_trace_ft():
    bad = {m: sorted(i for i in imps if i.startswith("trace_ft"))
           for m, imps in GRAPH.items() if m.startswith("trace_kernels")}
    assert not {m: v for m, v in bad.items() if v}


def test_trace_ft_imports_nothing_private_from_trace_kernels():
    bad = {}
    for m, imps in GRAPH.items():
        if m.startswith("trace_ft"):
            private = [i for i in imps if i.startswith("trace_kernels")
                       and any(p.startswith("_") and not p.startswith("__") for p in i.split(".")[1:])]
            private += [i for i in imps if i.startswith("trace_kernels.backends")]
            if private:
                bad[m] = sorted(private)
    assert not bad


def test_no_command_imports_a_sibling_command():
    bad = {}
    for m, imps in GRAPH.items():
        if m.startswith("trace_ft.commands."):
            siblings = [i for i in imps if i.startswith("trace_ft.commands.") and not i.startswith(m)]
            if siblings:
                bad[m] = sorted(siblings)
    assert not bad


def test_trace_ft_layers_import_only_downwards():
    bad = {}
    for m, imps in GRAPH.items():
        own = _layer(m)
        if own is None or own not in TRACE_FT_LAYERS:
            continue
        for i in imps:
            other = _layer(i)
            if other in TRACE_FT_LAYERS and TRACE_FT_LAYERS.index(other) > TRACE_FT_LAYERS.index(own):
                bad.setdefault(m, []).append(i)
    assert not bad, bad


def _edges(name: str, path: Path, is_package: bool) -> set[str]:
    """The project modules `name` imports, at any depth of its code (a lazy import inside a
    function is still an import): ``from X import n`` depends on X.n where that is a module,
    else on X itself."""
    modules = set(GRAPH)
    out = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycles():
    edges = {name: _edges(name, path, pkg) for name, path, pkg in _modules()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
