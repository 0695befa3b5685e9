"""The import graph stays one-way (pretrain -> segment -> launch -> bench) and private names stay private.

Read from the source with ``ast`` (nothing is imported): a module of a lower layer importing a higher
one, or any module importing a ``_name`` (or a ``_module``'s contents) from another package folder,
fails here with the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"pretrain": 0, "segment": 1, "launch": 2, "bench": 3}  # a module may import its own layer and below


def _sources() -> list[Path]:
    return sorted(p for top in LAYERS for p in (ROOT / top).rglob("*.py"))


def _package(path: Path) -> str:
    """Dotted package of a source file (its folder), e.g. segment/models/unet.py -> segment.models."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = _package(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
                if module.split(".")[0] not in LAYERS and (path.parent / f"{module.split('.')[0]}.py").exists():
                    module = f"{pkg}.{module}"  # a script beside it (bench/), imported by sys.path
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def violations(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        rel = path.relative_to(ROOT)
        layer = LAYERS[rel.parts[0]]
        pkg = _package(path)
        for line, module, names in _imports(path):
            top = module.split(".")[0]
            if top in LAYERS and LAYERS[top] > layer:
                bad.append(f"{rel}:{line}: {rel.parts[0]} (layer {layer}) imports {module} (layer {LAYERS[top]})")
            if top not in LAYERS:
                continue
            parts = module.split(".")
            owner = ".".join(parts[:-1]) if (ROOT / Path(*parts)).with_suffix(".py").exists() else module
            if owner == pkg:
                continue  # private names are shared inside one package folder
            private = [n for n in names if n.startswith("_")] + [p for p in parts[1:] if p.startswith("_")]
            if private:
                bad.append(f"{rel}:{line}: imports the private {', '.join(private)} of {module} from outside {owner}")
    return bad


def test_lower_layers_never_import_higher_ones_nor_private_names():
    assert violations(_sources()) == []


def test_the_check_catches_both_kinds(tmp_path, monkeypatch):
    """The rule itself: a pretrain module importing segment, and segment importing a private pretrain name."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    for rel, text in {"pretrain/a.py": "from segment.b import f\n", "pretrain/c.py": "_x = 1\n",
                      "segment/b.py": "from pretrain.c import _x\nfrom pretrain import c\n",
                      "segment/models/d.py": "from .._e import g\nfrom ..b import f\n", "segment/_e.py": "g = 1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(sorted(tmp_path.rglob("*.py")))
    assert any("pretrain/a.py:1" in v and "layer 1" in v for v in found)
    assert any("segment/b.py:1" in v and "_x" in v for v in found)
    assert any("segment/models/d.py:1" in v and "_e" in v for v in found)
    assert len(found) == 3, found


@pytest.mark.parametrize("top", sorted(LAYERS))
def test_every_layer_has_sources(top):
    assert any((ROOT / top).rglob("*.py"))


def test_the_shard_writer_does_not_import_torch():
    """Shard-writing worker processes (spawned, one per core) start with what they need only: with torch
    imported, each held ~510 MB of memory instead of ~40 MB."""
    import subprocess
    import sys

    code = "import sys, pretrain.shards, pretrain.passthrough; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
