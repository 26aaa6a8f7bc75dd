"""`requires-python` in pyproject.toml admits only interpreters that have every standard-library module the
package imports: a module new in 3.11 imported under a 3.10 floor breaks `pip install` users at start."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent
# standard-library modules added after 3.9, with the release that added them
NEW_STDLIB = {"zoneinfo": (3, 9), "graphlib": (3, 9), "tomllib": (3, 11), "wsgiref.types": (3, 11)}


def _floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert spec.startswith(">="), spec
    major, minor = spec.removeprefix(">=").strip().split(".")[:2]
    return int(major), int(minor)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_requires_python_covers_the_stdlib_modules_imported():
    floor = _floor()
    files = [*(ROOT / "rlcs_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    too_new = sorted((str(f.relative_to(ROOT)), m) for f in files for m in _imports(f)
                     if m in NEW_STDLIB and NEW_STDLIB[m] > floor)
    assert not too_new, f"requires-python >= {floor} but these imports need a newer Python: {too_new}"
