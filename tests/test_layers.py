"""The module layering: what a step sees never imports the orchestration above it (no import cycles)."""
import ast
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).parent
# module -> modules it must not import (at any depth of the file, lazily or not)
FORBIDDEN = {
    "context": {"lowbit.pipeline", "lowbit.steps", "lowbit.run", "lowbit.recipe"},
    "search": {"lowbit.pipeline", "lowbit.run", "lowbit.recipe"},
    "reconstruction": {"lowbit.pipeline", "lowbit.run", "lowbit.recipe"},
    "steps/base": {"lowbit.pipeline", "lowbit.context", "lowbit.run", "lowbit.recipe"},
    "state": {"lowbit.pipeline", "lowbit.context", "lowbit.steps", "lowbit.run"},
    "fold": {"lowbit.pipeline", "lowbit.context", "lowbit.steps"},
    "models/base": {"lowbit.pipeline", "lowbit.context", "lowbit.steps", "lowbit.fold"},
}


def runtime_imports(path: Path) -> set[str]:
    """Modules imported by a file, leaving out imports under `if TYPE_CHECKING:` (never executed)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_lower_layers_do_not_import_higher_ones():
    for module, banned in FORBIDDEN.items():
        imported = runtime_imports(ROOT / f"{module}.py")
        bad = {m for m in imported if any(m == b or m.startswith(b + ".") for b in banned)}
        assert not bad, f"lowbit/{module}.py imports {sorted(bad)}"


def test_steps_see_the_contexts_not_the_pipeline():
    for path in sorted((ROOT / "steps").glob("*.py")):
        assert "lowbit.pipeline" not in runtime_imports(path), path.name
