"""Imports run one way: the core (sparsity, models, permutation, prune, export) never imports the shell above
it (config, run, runs, lit, data) nor Lightning or Hydra, so a notebook can use it without a config."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "permsparse"

# package (first component below permsparse) -> the packages it may import; every import is checked,
# function-local ones included
LOWER = {
    "errors": set(),
    "utils": {"errors"},
    "sparsity": {"errors", "utils"},
    "models": {"errors", "utils"},
    "permutation": {"errors", "utils", "sparsity", "models"},
    "prune": {"errors", "utils", "sparsity", "models", "permutation"},
    "export": {"errors", "utils", "sparsity", "models", "permutation"},
    "data": {"errors", "utils"},
}
CORE = {"sparsity", "models", "permutation", "prune", "export"}
SHELL_ONLY = ("pytorch_lightning", "lightning", "hydra", "omegaconf")
ENTRY_POINTS = {"export/__main__.py"}  # command-line wrappers are shell, even inside a core package


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return out


def layer_violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.as_posix() in ENTRY_POINTS:
            continue
        package = rel.parts[0].removesuffix(".py")
        if package not in LOWER:
            continue
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] == "permsparse" and len(parts) > 1 and parts[1] != package and parts[1] not in LOWER[package]:
                bad.append(f"{rel}:{line} imports {module} (above {package})")
            if package in CORE and parts[0] in SHELL_ONLY:
                bad.append(f"{rel}:{line} imports {module} (the core stays free of Lightning and Hydra)")
    return bad


def test_no_import_runs_back_up_the_layers():
    assert layer_violations() == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    (tmp_path / "permutation").mkdir()
    (tmp_path / "permutation" / "x.py").write_text("def f():\n    from permsparse.config import ConfigError\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "y.py").write_text("import hydra\n")
    assert layer_violations(tmp_path) == [
        "export/y.py:1 imports hydra (the core stays free of Lightning and Hydra)",
        "permutation/x.py:2 imports permsparse.config (above permutation)",
    ]
