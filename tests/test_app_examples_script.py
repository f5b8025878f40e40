"""scripts/app_examples.py: the app's example queries segmented by its Segment handler, on one sheet."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("app_examples", ROOT / "scripts" / "app_examples.py")
app_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(app_examples)


def test_pooled_miou_pools_the_examples_patches_before_the_iou():
    rows = [{"labels": np.array([0, 0, 1, -1]), "predictions": np.array([0, 1, 1, 0])},
            {"labels": np.array([1, 1]), "predictions": np.array([1, 1])}]
    assert app_examples.pooled_miou(rows[:1], 2) == pytest.approx(50.0)  # IoU 1/2 and 1/2; -1 not scored
    # pooled: class 0 TP 1 of union 2, class 1 TP 3 of union 4 -> 62.5 (the per-image mean would be 75)
    assert app_examples.pooled_miou(rows, 2) == pytest.approx(62.5)


def test_sheet_and_json_for_the_builtin_default_with_random_weights(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    code = app_examples.main(["--backbone", "builtin", "--random-init", "--cache-dir", str(tmp_path / "cache"),
                              "--support-scenes", "3", "--num", "3", "--out", str(out)])
    assert code == 0
    result = json.loads(out.with_suffix(".json").read_text())
    names = [e["name"] for e in result["examples"]]
    assert names == ["heldout_1002_000000.png", "heldout_1002_000001.png", "heldout_1002_000002.png"]
    mious = [e["miou"] for e in result["examples"]]
    assert all(0 <= m <= 100 for m in mious)
    assert result["mean_image_miou"] == pytest.approx(np.mean(mious))
    assert 0 <= result["pooled_miou"] <= 100
    # two examples per row: 3 panels of 256 px + gaps each; two rows of 256 px + caption below a title line
    assert Image.open(out).size == (2 * (3 * 256 + 12) + 18, 26 + 2 * (256 + 18 + 6))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)


def test_random_init_with_weights_is_refused_with_one_line(tmp_path, capsys):
    code = app_examples.main(["--random-init", "--weights", "x.safetensors", "--out", str(tmp_path / "s.png")])
    assert code == 2
    assert "not allowed with argument" in capsys.readouterr().err
