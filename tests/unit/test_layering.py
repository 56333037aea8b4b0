"""The package's layers (docs/ARCHITECTURE.md "Layers"): every import in mixdpo_ds and kernels, lazy ones inside
functions included, goes to the module's own layer or a lower one, and the import graph has no cycle.

    0 compat  <  1 core  <  2 kernels  <  3 model  <  4 training  <  5 apps (and the CLI)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"compat": 0, "core": 1, "losses": 1, "kernels": 2, "model": 3, "training": 4, "apps": 5, "cli": 5}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for mixdpo_ds/** and kernels/** (installed as mixdpo_ds.kernels)."""
    out = {}
    for path in (ROOT / "mixdpo_ds").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").rglob("*.py"):
        parts = ("mixdpo_ds", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from pkg import func` -> pkg
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("mixdpo_ds."):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, m, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if m != "mixdpo_ds" and layer_of(m) is None]
    assert not unplaced, f"modules outside the layers {sorted(LAYERS)}: {unplaced}"


def test_no_module_imports_a_higher_layer():
    bad = [(m, dep) for m, deps in _graph().items() for dep in deps
           if layer_of(m) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(m)]
    assert not bad, "imports from a higher layer:\n" + "\n".join(f"  {m} -> {d}" for m, d in sorted(bad))


def test_compat_is_the_only_home_of_third_party_private_apis():
    """The private names the code relies on are used in mixdpo_ds/compat.py only."""
    private = ("_AllToAll", "_hf_deepspeed_config_weak_ref", "_active_adapter", "_disable_adapters")
    offenders = [(m, name) for m, p in _modules().items() if not m.endswith(".compat")
                 for name in private if name in p.read_text()]
    assert not offenders, offenders


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep in graph and dep.startswith(m + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_catches_a_bad_import(tmp_path):
    """The checks can fail: a core module importing the trainer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mixdpo_ds.training.trainer import MixDPOTrainer\n")
    deps = _imports(bad, "mixdpo_ds.core.bad", set(_modules()))
    assert deps == {"mixdpo_ds.training.trainer"}
    assert layer_of("mixdpo_ds.training.trainer") > layer_of("mixdpo_ds.core.bad")
