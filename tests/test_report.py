import json

import numpy as np
import pytest
from PIL import Image

from cribo.pretrain.report import plot_training_log, read_log


def _write_log(path, rows, torn=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if torn:
        text += '{"step": 9'
    path.write_text(text)


def _row(step, boot):
    return {"step": step, "loss": 3.0, "loss_global": 1.0, "loss_object": 1.0, "loss_cross_image": 1.0,
            "bootstrap_ratio": boot, "kept_clusters": 12.0}


def test_read_log_ignores_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, [_row(1, 0.0), _row(2, 0.5)], torn=True)
    assert [r["step"] for r in read_log(log)] == [1, 2]


def test_read_log_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="OUT/log.jsonl"):
        read_log(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n" + json.dumps(_row(1, 0.0)) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_log(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        read_log(empty)


def test_plot_writes_a_png(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, [_row(s, s / 100) for s in range(0, 100, 10)])
    out = plot_training_log(log, tmp_path / "curves.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 600
    assert (img < 250).any(), "the figure has drawn content"
