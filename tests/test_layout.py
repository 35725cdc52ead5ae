"""The package's shape, as a reader meets it: the import graph has floors, not loops (every import counted,
those inside functions too); the forward's ops are a leaf; the model never picks a backend (the loader does);
each kernel sits beside its launcher, its NumPy reference and (CUDA) its emulator."""

import ast
from pathlib import Path

import minidiff

PKG = Path(minidiff.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path) -> set:
    """The minidiff modules a file imports, at the top or inside a function."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "minidiff"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == "minidiff":
                base = node.module
            else:
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base)
    return found - {me}


GRAPH = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")
         if "default_model" not in p.parts and "sudoku_model" not in p.parts}


def test_the_import_graph_has_no_cycle():
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"
    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert len(GRAPH) > 30 and GRAPH["minidiff.model"]


def test_the_ops_are_a_leaf_and_the_model_picks_no_backend():
    assert GRAPH["minidiff.ops"] == {"minidiff.backend", "minidiff.tensors"}
    assert GRAPH["minidiff.tensors"] <= {"minidiff.backend"}
    backends = {"minidiff.gpu", "minidiff.kernels"} | {m for m in GRAPH if m.startswith("minidiff.kernels.")}
    for m in ("minidiff.model", "minidiff.ops", "minidiff.sampler", "minidiff.formats", "minidiff.schemes"):
        assert not GRAPH[m] & backends, (m, GRAPH[m] & backends)
    users = {m for m, deps in GRAPH.items() if deps & backends and not m.startswith(("minidiff.kernels", "minidiff.gpu"))}
    assert users == {"minidiff.loader"}, users                           # the one place a backend is chosen
    text = (PKG / "model.py").read_text() + (PKG / "ops.py").read_text()
    assert "cupy" not in text.replace("CuPy", "") and "getattr(gate_up, \"kernels\"" not in text


def test_each_kernel_sits_beside_its_launcher_reference_and_emulator():
    kernels = PKG / "kernels"
    sources = sorted(p for p in kernels.iterdir() if p.suffix in (".c", ".cu"))
    assert [p.name for p in sources] == ["lowbit_matmul.c", "moe_experts.cu"]
    for src in sources:
        for extra in ("", "_reference") + (("_emulator",) if src.suffix == ".cu" else ()):
            assert (kernels / f"{src.stem}{extra}.py").is_file(), f"{src.stem}{extra}.py"
    for p in PKG.rglob("*.py"):                                           # nothing found through the checkout
        assert "parents[1]" not in p.read_text(), p
