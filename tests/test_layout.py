"""The package's floors (docs/architecture.md): each imports only the floors below it,
checked by import-linter's layers contract in pyproject.toml; no import cycles; and
sdanim's own modules imported at the top of a module, where the graph can see them."""

import ast
import os
import shutil
import subprocess
import sys


from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sdanim")


def _lint(root: str) -> subprocess.CompletedProcess:
    require("importlinter")
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
                           "--config", os.path.join(ROOT, "pyproject.toml")],
                          capture_output=True, text=True, cwd=root, env=env)


def test_the_layer_contract_holds():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is checked, not hoped for: a core module that imports the CLI fails."""
    shutil.copytree(PACKAGE, tmp_path / "sdanim", ignore=shutil.ignore_patterns("__pycache__"))
    noise = tmp_path / "sdanim" / "core" / "noise.py"
    noise.write_text(noise.read_text() + "\nfrom sdanim.frontends import cli  # noqa: E402,F401\n")
    proc = _lint(str(tmp_path))
    assert proc.returncode != 0
    assert "sdanim.core.noise -> sdanim.frontends.cli" in proc.stdout


def _sdanim_imports(tree):
    """(line, module, at module top) of every import of sdanim's own modules."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sdanim"):
            yield node.lineno, node.module, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sdanim"):
                    yield node.lineno, alias.name, id(node) in top


def test_own_modules_are_imported_at_module_top():
    """Imports inside functions are only for optional third-party packages (TensorFlow,
    Ray, Gradio, torch, ...): an import of sdanim inside a function would hide an edge."""
    inside = []
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                inside += [f"{os.path.relpath(path, ROOT)}:{line} {module}"
                           for line, module, at_top in _sdanim_imports(tree) if not at_top]
    assert inside == []


def test_no_import_cycles():
    grimp = require("grimp")
    graph = grimp.build_graph("sdanim")
    modules = sorted(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & set(modules) for m in modules}
    # Tarjan's strongly connected components: a component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


# What reading files and running processes looks like in a module: what the core floor
# (pure functions of arrays, docs/architecture.md) must not do. `core/runtime.py` is the
# floor's one exception: it imports Keras quietly (a descriptor redirected for the import).
_IO_MODULES = {"subprocess", "imageio", "imageio_ffmpeg", "soundfile", "shutil", "tempfile", "glob"}
_IO_CALLS = {"open", "listdir", "remove", "makedirs", "walk", "isfile", "isdir", "exists", "getsize", "stat"}


def _io_in(tree) -> list:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {n}" for n in names if n.split(".")[0] in _IO_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in _IO_CALLS:
                found.append(f"{node.lineno}: {name}()")
    return found


def test_the_core_floor_reads_no_files_and_runs_no_processes(tmp_path):
    """core holds the math of a walk; decoding images, audio, video and walk files is
    sdanim.formats' (item 9 of issue 33). Checked on the source, and shown to catch a
    core module that opens a file."""
    def scan(package):
        core = os.path.join(package, "core")
        found = {}
        for name in sorted(os.listdir(core)):
            if name.endswith(".py") and name != "runtime.py":
                with open(os.path.join(core, name), encoding="utf-8") as f:
                    hits = _io_in(ast.parse(f.read()))
                if hits:
                    found[name] = hits
        return found

    assert scan(PACKAGE) == {}
    shutil.copytree(PACKAGE, tmp_path / "sdanim", ignore=shutil.ignore_patterns("__pycache__"))
    noise = tmp_path / "sdanim" / "core" / "noise.py"
    noise.write_text(noise.read_text() + "\n\ndef _peek(path):\n    with open(path) as f:\n        return f.read()\n")
    assert list(scan(str(tmp_path / "sdanim"))) == ["noise.py"]
