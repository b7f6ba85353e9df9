"""Architecture rules for the `kvideo` package, checked statically (ast) where possible.

1. no import circle (lazy, function-level imports included; `if TYPE_CHECKING:` skipped)
2. no public function / method with more than MAX_PARAMS parameters
3. no file over MAX_LINES lines
4. `import kvideo.pipeline` loads no training-only module
5. networks (kvideo/models/) read or write no files
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvideo"
ROOT = PACKAGE.parent
MAX_PARAMS = 8
MAX_LINES = 600
FILE_CALLS = {"load_file", "safe_open", "save_file", "read_text", "read_bytes", "write_text", "write_bytes"}


# ----------------------------------------------------------------------------- helpers
def package_files(package=PACKAGE):
    """All .py files under `package`, sorted."""
    return sorted(package.rglob("*.py"))


def module_name(path, package=PACKAGE):
    """Dotted module name of `path`; a package's __init__.py is the package itself."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rel(path):
    """`path` relative to the repo root (if under it), for messages."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def is_type_checking(test):
    """True for the test of `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree):
    """Every Import / ImportFrom node at any depth, except those only under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_targets(node, importer, is_init, modules):
    """Modules of `modules` that one import node of module `importer` refers to."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: climb from the importer's package
            pkg = importer.split(".") if is_init else importer.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    for name in names:
        while name and name not in modules:  # `import kvideo.a.b.attr` -> deepest real module
            name = name.rpartition(".")[0]
        if name:
            yield name


def build_import_graph(package=PACKAGE):
    """{module: {imported module: [(file, line), ...]}} over the package, self-imports dropped."""
    files = {module_name(p, package): p for p in package_files(package)}
    graph = {m: {} for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in runtime_imports(tree):
            for target in import_targets(node, mod, path.name == "__init__.py", files):
                if target == mod:
                    continue
                sites = graph[mod].setdefault(target, [])
                if (path, node.lineno) not in sites:  # one site per import line, not per name
                    sites.append((path, node.lineno))
    return graph


def strongly_connected(graph):
    """Tarjan's algorithm: the strongly connected components with more than one node."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_staticmethod(fn):
    """True if `fn` is decorated with @staticmethod."""
    return any(getattr(d, "id", getattr(d, "attr", None)) == "staticmethod" for d in fn.decorator_list)


def count_params(fn, is_method):
    """Parameters of `fn`, *args and **kwargs counting one each; a method's self/cls is not counted."""
    a = fn.args
    positional = a.posonlyargs + a.args
    n = len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    if is_method and positional and not is_staticmethod(fn):
        n -= 1
    return n


def is_public(name):
    """Public API name: no leading underscore, or a dunder such as __init__ / __call__."""
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def public_functions(body, prefix="", in_class=False):
    """(qualified name, node, is_method) for public module functions and methods of public classes.

    Functions nested inside functions are not visited; if/try/with blocks are looked into."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if is_public(stmt.name):
                yield prefix + stmt.name, stmt, in_class
        elif isinstance(stmt, ast.ClassDef):
            if not stmt.name.startswith("_"):
                yield from public_functions(stmt.body, f"{prefix}{stmt.name}.", True)
        else:
            for field in ("body", "orelse", "finalbody"):
                yield from public_functions(getattr(stmt, field, []), prefix, in_class)
            for handler in getattr(stmt, "handlers", []):
                yield from public_functions(handler.body, prefix, in_class)


def long_files(paths, max_lines=MAX_LINES):
    """'file: N lines' for each of `paths` longer than `max_lines`."""
    lengths = ((p, len(p.read_text().splitlines())) for p in paths)
    return [f"{rel(p)}: {n} lines" for p, n in lengths if n > max_lines]


def file_access(tree):
    """(line, what) for each file read/write call or safetensors import in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            torch_io = isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "torch" and f.attr in {"load", "save"}
            if (isinstance(f, ast.Name) and name == "open") or name in FILE_CALLS or torch_io:
                yield node.lineno, f"calls {ast.unparse(f)}()"
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "safetensors" for a in node.names):
            yield node.lineno, "imports safetensors"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "safetensors":
            yield node.lineno, "imports safetensors"


# ----------------------------------------------------------------------------- helper self-tests
def test_cycle_finder_on_synthetic_graphs():
    cyclic = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert strongly_connected(cyclic) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b": []}, "b": {"c": []}, "c": {}, "d": {"a": [], "c": []}}) == []


def test_import_graph_resolution(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from pkg.sub.c import thing\n",  # lazy import counts
        "sub/__init__.py": "from .c import thing\n",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\nfrom ..a import x\n",
    }
    for name, src in sources.items():
        (pkg / name).write_text(src)
    graph = build_import_graph(pkg)
    assert set(graph["pkg.a"]) == {"pkg.b"}
    assert set(graph["pkg.b"]) == {"pkg.sub.c"}
    assert set(graph["pkg.sub"]) == {"pkg.sub.c"}
    assert set(graph["pkg.sub.c"]) == {"pkg.a"}  # the TYPE_CHECKING import is skipped
    assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_param_counter_on_synthetic_code():
    tree = ast.parse(textwrap.dedent("""
        class C:
            def f(self, a, *b, c, **d): pass
            @staticmethod
            def g(a, b): pass
            def _private(self, a): pass
        class _Hidden:
            def h(self): pass
        def top(a, b=1, /, c=2, *, d): pass
        def outer():
            def nested(x): pass
    """))
    found = {name: count_params(fn, m) for name, fn, m in public_functions(tree.body)}
    assert found == {"C.f": 4, "C.g": 2, "top": 4, "outer": 0}


def test_line_and_file_access_checks_on_synthetic_code(tmp_path):
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert long_files(sorted(tmp_path.glob("*.py"))) == [f"{tmp_path / 'long.py'}: {MAX_LINES + 1} lines"]
    tree = ast.parse("import torch\nopen('f')\ntorch.load('f')\nPath('f').read_text()\nfrom safetensors import safe_open\nx.load()")
    assert [line for line, _ in sorted(file_access(tree))] == [2, 3, 4, 5]


# ----------------------------------------------------------------------------- architecture rules
def test_no_import_cycles():
    graph = build_import_graph()
    report = []
    for comp in strongly_connected(graph):
        report.append("cycle: " + " <-> ".join(comp))
        for src in comp:
            for dst, sites in sorted(graph[src].items()):
                if dst in comp:
                    report += [f"    {rel(p)}:{line} {src} -> {dst}" for p, line in sorted(sites)]
    assert not report, "import circles in kvideo/:\n" + "\n".join(report)


def test_no_public_function_with_too_many_parameters():
    report = []
    for path in package_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, fn, is_method in public_functions(tree.body):
            n = count_params(fn, is_method)
            if n > MAX_PARAMS:
                report.append(f"{rel(path)}:{fn.lineno} {name} ({n} parameters)")
    assert not report, f"public functions with more than {MAX_PARAMS} parameters:\n" + "\n".join(report)


def test_no_file_too_long():
    report = long_files(package_files())
    assert not report, f"files over {MAX_LINES} lines:\n" + "\n".join(report)


def test_pipeline_import_loads_no_training_module():
    code = "import sys, kvideo.pipeline\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith('kvideo'))))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"`import kvideo.pipeline` failed:\n{proc.stderr}"
    loaded = proc.stdout.split()
    training_only = {"kvideo.models.lpips", "kvideo.models.discriminator"}
    bad = [m for m in loaded if m.startswith("kvideo.train") or m in training_only]
    assert not bad, "`import kvideo.pipeline` loads training-only modules:\n" + "\n".join(bad)


def test_networks_read_no_files():
    report = []
    for path in package_files(PACKAGE / "models"):
        tree = ast.parse(path.read_text(), filename=str(path))
        report += [f"{rel(path)}:{line} {what}" for line, what in sorted(file_access(tree))]
    assert not report, "kvideo/models/ must not touch files (load in the caller):\n" + "\n".join(report)
