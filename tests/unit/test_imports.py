"""The layering of docs/architecture.md, read from the source: every import of every module under meshlm/.

Imports inside functions count (a function-local import is still a dependency). `from pkg import name`
counts as importing pkg.name when that is a module, else the module pkg/__init__.py takes the name from,
so `from meshlm import LLM` is an import of meshlm.llm.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2]  # the folder that holds the meshlm package
PACKAGE = SRC / "meshlm"


def _is_module(name: str) -> bool:
    path = SRC / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_of(path: Path) -> tuple[str, bool]:
    """(dotted name, is a package __init__) of a source file."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a `from X import ...` (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _reexports(package: str) -> dict[str, str]:
    """Names a meshlm package's __init__.py imports, mapped to the module each comes from."""
    init = SRC / package.replace(".", "/") / "__init__.py"
    if not init.is_file():
        return {}
    out = {}
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = _base(node, package, True)
            for alias in node.names:
                out[alias.asname or alias.name] = base
    return out


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `source`, which is the module `module`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(node, module, is_package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if not base.startswith("meshlm"):
                    out += [(node.lineno, base), (node.lineno, full)]  # `from torch import distributed`
                elif _is_module(full):
                    out.append((node.lineno, full))
                else:
                    out.append((node.lineno, _reexports(base).get(alias.name, base)))
    return out


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """'file:line imports X' for every import under `package` of a module under one of `forbidden`."""
    folder = SRC / package.replace(".", "/")
    files = sorted(folder.rglob("*.py"))
    assert files, f"no modules under {folder}"
    bad = []
    for path in files:
        module, is_package = _module_of(path)
        for line, target in imports(path.read_text(), module, is_package):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    return bad


def test_resolver():
    """The resolver sees through re-exports, relative imports, `from torch import x` and local imports."""
    assert (1, "meshlm.llm") in imports("from meshlm import LLM", "meshlm.plan.bench")
    assert (1, "meshlm.config") in imports("from meshlm import SamplingParams", "meshlm.plan.bench")
    assert (1, "meshlm.parallel.comm") in imports("from meshlm.parallel import comm", "meshlm.serve.app")
    assert (1, "meshlm.engine.engine") in imports("from ..engine import engine", "meshlm.serve.app")
    assert (1, "meshlm.engine.request") in imports("from .request import Request", "meshlm.engine.engine")
    assert (1, "meshlm.engine.request") in imports("from .request import Request", "meshlm.engine", True)
    assert (1, "torch.distributed") in imports("from torch import distributed", "meshlm.models.llama")
    assert (2, "torch.distributed") in imports("def f():\n    import torch.distributed as dist\n", "meshlm.x")
    assert violations("meshlm.serve", ("meshlm.serve.config",))  # the walk finds real imports


LEAF = ("meshlm.engine", "meshlm.serve", "meshlm.llm")


@pytest.mark.parametrize("package,forbidden", [
    ("meshlm.models", ("torch.distributed",)),
    ("meshlm.plan", LEAF),
    ("meshlm.telemetry", LEAF),
    ("meshlm.serve", ("meshlm.parallel",)),
    ("meshlm.engine", ("meshlm.serve",)),
], ids=["models-no-distributed", "plan-is-a-leaf", "telemetry-is-a-leaf", "serve-not-parallel",
        "engine-not-serve"])
def test_layering(package, forbidden):
    """Model code knows nothing of ranks; plan and telemetry are leaves; serve talks to the engine only."""
    assert violations(package, forbidden) == []
