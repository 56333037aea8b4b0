"""Every `__all__` in the package (kernels/ included) names only things that exist and every public function and
class defined in its module; a stale list would make `from mixdpo_ds.losses import *` miss or break."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules_with_all():
    out = []
    for base, package in ((ROOT / "mixdpo_ds", "mixdpo_ds"), (ROOT / "kernels", "mixdpo_ds.kernels")):
        for path in sorted(base.rglob("*.py")):
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                   for n in tree.body):
                parts = path.relative_to(base).with_suffix("").parts
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                out.append((".".join((package, *parts)), tree))
    return out


MODULES = _modules_with_all()


def test_some_modules_have_all():
    assert {"mixdpo_ds.core.losses", "mixdpo_ds.kernels"} <= {name for name, _ in MODULES}


@pytest.mark.parametrize("name,tree", MODULES, ids=[m for m, _ in MODULES])
def test_all_is_current(name, tree):
    module = importlib.import_module(name)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []
    defined = {n.name for n in tree.body
               if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    assert sorted(defined - set(module.__all__)) == []
