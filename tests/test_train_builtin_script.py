"""scripts/train_builtin.sh: the built-in recipe in one command (scenes, training with the curve,
export, Table-1 row), run end to end at toy size on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    settings = dict(PYTHON=sys.executable, DEVICE="cpu", PRECISION="fp32", SCENES=str(tmp_path / "scenes"),
                    OUT=str(tmp_path / "run"), TRAIN_SCENES="6", SUPPORT_SCENES="8", VAL_SCENES="3", STEPS="2",
                    BATCH="3", WORKERS="1", EVAL_EVERY="1", EVAL_SUPPORT="8", EVAL_QUERIES="2", SEEDS="1",
                    RATIOS="1,8", STAGES="", OMP_NUM_THREADS="1")
    settings.update(env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "train_builtin.sh")], capture_output=True, text=True,
                          env={**os.environ, **settings}, timeout=900)


def test_one_command_makes_scenes_trains_exports_and_scores(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    scenes = tmp_path / "scenes" / "images"
    assert [len(list((scenes / s).glob("*.png"))) for s in ("train", "support", "val")] == [6, 8, 3]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_miou" in r] == [0, 1, 2]
    assert (run / "training_curves.png").stat().st_size > 0
    assert json.loads((run / "backbone.json").read_text())["arch"] == "vit_mini_convstem_patch16"  # ARCH defaults to the built-in's
    table = (run / "table1" / "baselines.md").read_text()
    assert "| CrIBo |" in table and "texture descriptor" in table and "| 1/1 | 1/8 |" in table


def test_a_failing_stage_stops_the_script_before_export(tmp_path):
    done = _run(tmp_path, DEVICE="no-such-device", TRAIN_SCENES="2", SUPPORT_SCENES="1", VAL_SCENES="2")
    assert done.returncode != 0
    assert "device" in done.stderr.lower()
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_continued_stages_chain_from_the_base_run_and_score_the_last(tmp_path):
    done = _run(tmp_path, STAGES="A:2:mild:1 B:1:grey:0", RATIOS="1", TRAIN_SCENES="4")
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    a, b = (json.loads((run / "stages" / n / "config.json").read_text())["config"] for n in ("A", "B"))
    assert a["init_from"] == str(run / "backbone.safetensors") and b["init_from"] == str(run / "stages" / "A")
    assert (a["max_steps"], a["augment"], a["freeze_last_layer_steps"], a["ci_start_step"]) == (2, "mild", 1, 1)
    assert (b["max_steps"], b["augment"], b["img_size"], b["crop_scale"]) == (1, "grey", 160, [0.25, 0.6])
    assert json.loads((run / "stages" / "B" / "backbone.json").read_text())["step"] == 1
    table = (run / "table1" / "baselines.md").read_text()
    assert "| CrIBo base run |" in table and "| CrIBo |" in table
