"""The package's shape: no import circle among pipeline's modules (imports inside functions
count; those under ``if TYPE_CHECKING:`` do not, they never run), no module over ~400 lines,
each module's first docstring says what it owns, and the core imports no ray, mlflow or dvc."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
CORE = ("nn", "pruning", "profiling", "allocation")
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports(path: Path, known: set[str]) -> set[str]:
    """The pipeline modules ``path`` imports when it runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {name: imports(path, known) - {name} for name, path in found.items()}
    # importing pipeline.a.b runs pipeline/__init__ and pipeline/a/__init__ first: no edge
    # needed, those are docstring-only (checked below)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle_and_only_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    assert cycle(import_graph()) is None


def test_subpackage_inits_hold_only_a_docstring():
    """So that importing one module never drags in (or circles through) its siblings."""
    for path in PACKAGE.glob("*/__init__.py"):
        body = ast.parse(path.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), path


def test_no_module_over_the_size_limit():
    sizes = {name: len(p.read_text().splitlines()) for name, p in modules().items()}
    assert max(sizes.values()) <= MAX_LINES, max(sizes.items(), key=lambda kv: kv[1])


def test_every_module_says_what_it_owns():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, name


def test_the_core_imports_no_ray_mlflow_or_dvc_and_no_edges():
    for name, path in modules().items():
        if name.split(".")[1:2] not in [[c] for c in CORE]:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for imported in names:
                assert imported.split(".")[0] not in ("ray", "mlflow", "dvc"), (name, imported)
                assert not imported.startswith("pipeline.edges"), (name, imported)


def test_process_supervision_has_its_own_module():
    source = (PACKAGE / "edges" / "supervise.py").read_text()
    assert "PR_SET_PDEATHSIG" in source or "prctl" in source
    others = [p for p in PACKAGE.rglob("*.py") if p.name != "supervise.py"]
    assert not [p for p in others if "prctl" in p.read_text()]
