"""The layering rules of ../shared/design.md, enforced by walking every import in the tree."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

# package -> module prefixes it must never import
FORBIDDEN = {
    "engine/models": ("torch.distributed", "engine.comm", "engine.parallel", "engine.training", "engine.data",
                      "engine.checkpoint"),
    "engine/modalities": ("torch.distributed", "engine.comm", "engine.parallel", "engine.training", "engine.data",
                          "engine.checkpoint"),
    "engine/ops": ("torch.distributed", "engine.comm", "engine.parallel", "engine.models", "engine.training"),
    "engine/comm": ("engine.parallel", "engine.models", "engine.modalities", "engine.training", "engine.data",
                    "engine.checkpoint", "engine.ops"),
    "engine/parallel": ("engine.training", "engine.data", "engine.checkpoint"),
    "engine/data": ("torch.distributed", "engine.comm", "engine.parallel", "engine.training", "engine.checkpoint"),
}


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
    return found


def violations(package_dir: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package_dir).rglob("*.py")):
        for line, mod in imported_modules(path, root):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(root)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("package_dir", sorted(FORBIDDEN))
def test_layer_imports_point_down(package_dir):
    assert (ROOT / package_dir).is_dir()
    assert violations(package_dir, FORBIDDEN[package_dir]) == []


def test_checker_catches_a_violation(tmp_path):
    """The walk must see plain, from- and relative imports, or the test above proves nothing."""
    pkg = tmp_path / "engine" / "models"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("import torch.distributed as dist\nfrom engine.comm import STATS\n"
                                "from ..parallel import plan\nfrom torch import nn\n")
    found = violations("engine/models", FORBIDDEN["engine/models"], root=tmp_path)
    assert any("bad.py:1" in f for f in found)
    assert any("bad.py:2" in f for f in found)
    assert any("bad.py:3" in f and "engine.parallel" in f for f in found)
    assert not any("bad.py:4" in f for f in found)
