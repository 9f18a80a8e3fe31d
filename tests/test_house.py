"""The house keeps its shape: imports run one way between the library's packages, no file reads another file's
`_private` names, no library file is over 500 lines, and plotly / ipywidgets / Jupyter stay out of `unitok/`.
(docs/design.md, "One house for three models", draws the layers this test enforces.)"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a package may import its own files and any package on a lower layer, never one above
LAYER = {"cli": 6, "studies": 5, "generator": 4, "mllm": 4, "transformer": 3, "training": 2, "evaluation": 2,
         "tokenizer": 1, "data": 1, "checkpoint": 0, "torchvision_fix": 0, "cpu_share": 0}
JUPYTER = ("ipywidgets", "plotly", "IPython", "ipykernel", "nbformat", "nbclient", "anywidget")


def library_files():
    return sorted(p for p in (ROOT / "unitok").rglob("*.py"))


def imports(path: Path):
    """(module parts under unitok, imported names) for each `from ... import` of a library file (lazy ones too)."""
    rel = path.relative_to(ROOT / "unitok").with_suffix("").parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[:len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "unitok":
                parts = node.module.split(".")[1:]
            else:
                yield (node.module or "").split("."), [a.name for a in node.names]
                continue
            yield ["unitok", *parts], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split("."), []


def test_imports_run_down_the_layers():
    up = []
    for path in library_files():
        own = path.relative_to(ROOT / "unitok").parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for parts, names in imports(path):
            if parts[0] != "unitok" or len(parts) < 2:
                continue
            target = parts[1]
            if target in LAYER and target != own and LAYER[target] > LAYER[own]:
                up.append(f"{path.relative_to(ROOT)} imports unitok.{'.'.join(parts[1:])}")
    assert not up, "imports that run up the layers:\n" + "\n".join(up)


def test_no_private_name_is_imported_from_another_file():
    private = [f"{path.relative_to(ROOT)}: {name} from {'.'.join(parts)}"
               for path in library_files() for parts, names in imports(path) if parts[0] == "unitok"
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_library_file_is_over_500_lines():
    files = library_files() + sorted((ROOT / "widgets").glob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_library_never_imports_jupyter_or_plotly():
    found = [f"{path.relative_to(ROOT)}: {'.'.join(parts)}" for path in library_files()
             for parts, _ in imports(path) if parts[0] in JUPYTER]
    assert not found, found


def test_no_import_circle_between_library_files():
    def file_of(parts, names):
        """The library file an import reads (a module, or a package's file named by the imported name)."""
        base = ROOT / Path(*parts)
        found = {base.with_suffix(".py")} if base.with_suffix(".py").is_file() else set()
        if base.is_dir():
            found |= {base / f"{n}.py" for n in names if (base / f"{n}.py").is_file()}
        return found

    graph = {p: set() for p in library_files() if p.name != "__init__.py"}
    for path in graph:
        for parts, names in imports(path):
            if parts[0] == "unitok":
                graph[path] |= {f for f in file_of(parts, names) if f in graph and f != path}
    state, circles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                circles.append(" -> ".join(str(p.relative_to(ROOT)) for p in stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)
