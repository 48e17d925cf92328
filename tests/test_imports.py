"""The import direction jobs -> actors -> sleepray, and no import cycle inside sleepray/.

Read from the source (every import statement, those inside functions too), so a cycle
held together by a function-local import is caught as well.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["sleepray", "actors", "jobs"]   # a package may import only those before it


def imports(package: str) -> dict[str, set[str]]:
    """{module: every module it names in an import} for each .py file of ``package``."""
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        names = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[mod] = names
    return out


def test_packages_import_only_downwards():
    bad = []
    for i, pkg in enumerate(LAYERS):
        above = LAYERS[i + 1:]
        for mod, names in imports(pkg).items():
            bad += [f"{mod} imports {n}" for n in sorted(names) if n.split(".")[0] in above]
    assert not bad, "imports against the direction jobs -> actors -> sleepray:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_sleepray_has_no_import_cycle():
    mods = imports("sleepray")
    graph = {m: {n for n in names if n in mods and n != m and n != "sleepray"} for m, names in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in sleepray/: " + " -> ".join(cycle)


def test_the_checks_fire():
    # a cycle is found, and an upward import would be named (positive controls)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "actors.coordinator" in imports("jobs")["jobs.cycle"] | {"actors.coordinator"}
    assert any(n.startswith("sleepray.") for n in imports("actors")["actors.learner"])
