"""The package boundaries and the public surface (docs/ARCHITECTURE.md): import arrows point down, the
package re-exports resolve, old CLI spellings keep working and say they are deprecated."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(folder: Path, recursive: bool = True) -> list[tuple[str, str]]:
    out = []
    for f in sorted(folder.rglob("*.py") if recursive else folder.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out += [(f.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((f.name, node.module))
    return out


def test_the_core_imports_neither_the_method_nor_retrieval_nor_the_app():
    bad = [(f, m) for f, m in _imports(REPO / "cribo", recursive=False) if m.split(".")[0] in ("index", "app")
           or m.startswith("cribo.pretrain")]
    assert not bad, bad


def test_retrieval_never_imports_the_method_or_the_app():
    bad = [(f, m) for f, m in _imports(REPO / "index") if m.startswith(("cribo.pretrain", "app"))]
    assert not bad, bad


@pytest.mark.parametrize("package", ["cribo", "cribo.pretrain", "index"])
def test_every_re_exported_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__ and module.__doc__ and "Usage" in module.__doc__
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(module, "nope")


def test_old_seed_spellings_still_parse_and_say_they_are_deprecated(capsys):
    import build_index
    import evaluate
    args = build_index.build_parser().parse_args(["--dataset", "voc", "--root", "r", "--out", "o", "--seed", "3"])
    assert args.support_seed == 3 and args.init_seed == 0
    assert "--seed is deprecated, use --support-seed" in capsys.readouterr().err
    args = build_index.build_parser().parse_args(["--dataset", "voc", "--root", "r", "--out", "o", "--support-seed", "4"])
    assert args.support_seed == 4 and capsys.readouterr().err == ""
    args = evaluate.build_parser().parse_args(["--dataset", "voc", "--root", "r", "--random-init", "--seed", "5"])
    assert args.init_seed == 5
    assert "--seed is deprecated, use --init-seed" in capsys.readouterr().err
