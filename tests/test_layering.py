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


# ---- the demo datasets (omni_datasets/) are plugins: outside the engine, on its public API
PLUGINS = ROOT / "omni_datasets"
PUBLIC = ("engine", "engine.batch", "engine.config", "engine.data", "engine.models", "engine.modalities",
          "engine.checkpoint")


def test_engine_never_imports_the_dataset_plugins():
    assert violations("engine", ("omni_datasets",)) == []


def _plugin_imports(root: Path = ROOT) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, engine module, names) for every engine import under omni_datasets/."""
    found = []
    for path in sorted((root / "omni_datasets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "engine"]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "engine":
                found.append((path.name, node.lineno, node.module, [a.name for a in node.names]))
    return found


def test_dataset_plugins_use_only_the_engine_public_api():
    """Only the engine's public modules, and only names they list in __all__."""
    import importlib

    imports = _plugin_imports()
    assert len(imports) > 10 and PLUGINS.is_dir()
    bad = []
    for file, line, module, names in imports:
        if module not in PUBLIC:
            bad.append(f"{file}:{line} imports {module} (not public: use one of {PUBLIC})")
            continue
        exported = set(getattr(importlib.import_module(module), "__all__", ()))
        bad += [f"{file}:{line} imports {module}.{n} (not in its __all__)" for n in names if n not in exported]
    assert bad == []


def test_public_api_check_catches_a_private_import(tmp_path):
    pkg = tmp_path / "omni_datasets"
    pkg.mkdir()
    (pkg / "bad.py").write_text("from engine.data.omni_packing import pack_rows\nfrom engine.data import pack_rows\n")
    found = _plugin_imports(tmp_path)
    assert [(m, n) for _, _, m, n in found] == [("engine.data.omni_packing", ["pack_rows"]), ("engine.data", ["pack_rows"])]
    assert found[0][2] not in PUBLIC and found[1][2] in PUBLIC
