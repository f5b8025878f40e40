"""The training presets equal the authors' released runs, field by field.

Reads the argument files of the three released checkpoints (``../shared/reference/released-args/``)
and checks every key: it has a TrainConfig counterpart with the same value, or the project fixes that
behaviour to the released value, or it only manages the run (paths, lengths, batch size: given on the
command line), or the reference never reads it. A key in none of these classes fails the test, so a
new argument cannot go unnoticed. docs/fidelity.md has the same table with the reasons.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cribo.pretrain.config import RECIPES, TrainConfig, config_from_recipe

RELEASED_ARGS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "released-args"
RUNS = {"in1k-vits16": "vits16-in_args.json", "in1k-vitb16": "vitb16-in_args.json",
        "coco-vits16": "vits16-coco_args.json"}


def expected_fields(a: dict) -> dict[str, object]:
    """The TrainConfig value each released argument implies (keys: TrainConfig fields)."""
    assert a["pos_alpha"][0] == a["pos_alpha"][1], "a pos_alpha ramp has no counterpart (lambda_pos is constant)"
    for c in ("warmup_teacher_temp", "teacher_temp"):  # one teacher-temperature schedule serves both heads
        assert a[c + "_c"] == a[c], f"{c}_c != {c}: the project has one schedule"
    assert a["out_dim_c"] == a["out_dim"], "the project has one L for both last layers"
    return {
        "arch": f"{a['arch']}_patch{a['patch_size']}_224",
        "out_dim": a["out_dim"],
        "norm_last_layer": a["norm_last_layer"],
        "momentum_teacher": a["momentum_teacher"],
        "warmup_teacher_temp": a["warmup_teacher_temp"],
        "teacher_temp": a["teacher_temp"],
        "teacher_temp_warmup_epochs": a["warmup_teacher_temp_epochs"],
        "student_temp": a["student_temp_c"],  # objects; the [CLS] term uses CrIBoLoss's default, also 0.1
        "precision": "fp16" if a["use_fp16"] else "fp32",
        "weight_decay": a["weight_decay"],
        "weight_decay_end": a["weight_decay_end"],
        "clip_grad": a["clip_grad"],
        "freeze_last_layer_epochs": a["freeze_last_layer"],
        "lr": a["lr"],
        "warmup_epochs": a["warmup_epochs"],
        "min_lr": a["min_lr"],
        "drop_path": a["drop_path_rate"],
        "crop_scale": tuple(a["global_crops_scale"]),
        "seed": a["seed"],
        "n_sinkhorn": a["sinkhorn_iterations"],
        "lambda_pos": a["pos_alpha"][0],
        "num_clusters": a["n_tokens"],
        "bank_images": a["queue_size"],
        "n_outer": a["n_iter"],
        "clustering": "reference" if a["update_c"] else "paper",
    }


#: Behaviour the project fixes (no flag): the released value must be the one it implements.
FIXED = {"use_bn_in_head": False, "optimizer": "adamw", "local_crops_number": 0, "sinkhorn_lambda": 20.0,
         "which_features": "last", "same_teacher_augmentations": False, "normalized_matching": True}
#: Run management: data paths, output, length, per-GPU batch, workers, launcher (command-line flags).
RUN = {"image_queries", "labels_path", "output_dir", "saveckp_freq", "num_workers", "dist_url", "local_rank",
       "dataset_type", "imagenet1k_path", "coco_path", "data_path", "untar_path", "start_checkpoint_path",
       "batch_size_per_gpu", "epochs"}
#: Read by nothing that the released runs execute: ``student_temp`` is stored by ``Clustering`` and never
#: used; local crops are off (0); ``resnet_dilate`` concerns ResNet backbones only.
NOT_READ = {"student_temp", "local_crops_scale", "resnet_dilate"}
#: Converted keys consumed by ``expected_fields`` besides their own name.
CONSUMED = {"patch_size", "out_dim_c", "warmup_teacher_temp_c", "teacher_temp_c", "warmup_teacher_temp_epochs",
            "student_temp_c", "use_fp16", "freeze_last_layer", "drop_path_rate", "global_crops_scale",
            "sinkhorn_iterations", "pos_alpha", "n_tokens", "queue_size", "n_iter", "update_c"}

pytestmark = pytest.mark.skipif(not RELEASED_ARGS.is_dir(),
                                reason=f"released argument files absent: {RELEASED_ARGS} (shared/ beside the repo)")


def released(name: str) -> dict:
    return json.loads((RELEASED_ARGS / RUNS[name]).read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_released_argument_is_classified(name):
    a = released(name)
    mapped = set(expected_fields(a)) & set(a)
    unclassified = set(a) - mapped - CONSUMED - set(FIXED) - RUN - NOT_READ
    assert not unclassified, f"{RUNS[name]}: arguments with no counterpart or reason: {sorted(unclassified)}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_preset_equals_the_released_run_field_by_field(name):
    a = released(name)
    config = config_from_recipe(name, data="d", output_dir="o", batch_size=a["batch_size_per_gpu"], max_steps=10)
    got = {field: getattr(config, field) for field in expected_fields(a)}
    diff = {f: (got[f], v) for f, v in expected_fields(a).items() if got[f] != v}
    assert not diff, f"preset {name} vs {RUNS[name]} (preset, released): {diff}"
    assert {k: a[k] for k in FIXED} == FIXED, f"{RUNS[name]} uses another fixed behaviour"
    assert config.ci_normalisation == "reference"  # the authors' code, which trained these checkpoints
    assert config.clip_grad == a["clip_grad"] and config.norm_last_layer == a["norm_last_layer"]


def test_released_runs_differ_where_the_issue_found_it():
    """The two ViT-S runs had no clipping and no last-layer normalisation; the ViT-B run had both."""
    assert [(released(n)["clip_grad"], released(n)["norm_last_layer"]) for n in sorted(RUNS)] == \
        [(0.0, False), (0.3, True), (0.0, False)]
    assert RECIPES["in1k-vits16"].overrides["precision"] == "fp16"


def test_config_rejects_unknown_modes_naming_the_flag():
    with pytest.raises(ValueError, match=r"clustering='authors'.*choose one of paper, reference \(--clustering\)"):
        TrainConfig(data="d", output_dir="o", batch_size=1, max_steps=1, clustering="authors")
    with pytest.raises(ValueError, match=r"ci_normalisation='z1'.*\(--ci-normalisation\)"):
        TrainConfig(data="d", output_dir="o", batch_size=1, max_steps=1, ci_normalisation="z1")


def test_fidelity_flags_reach_the_config_and_override_a_preset():
    from cribo.errors import UsageError
    from train import build_train_parser

    base = ["--data", "d", "--batch-size", "2", "--max-steps", "3", "--output-dir", "o"]
    args = vars(build_train_parser().parse_args([*base, "--preset", "in1k-vits16", "--clustering", "paper"]))
    config = config_from_recipe(args.pop("preset"), **{k: v for k, v in args.items() if k not in ("crash_at_step", "debug")})
    assert (config.clustering, config.ci_normalisation) == ("paper", "reference")  # flag wins, preset fills
    args = vars(build_train_parser().parse_args([*base, "--arch", "vit_tiny_patch16_224", "--ci-normalisation",
                                                 "reference"]))
    config = config_from_recipe(args.pop("preset"), **{k: v for k, v in args.items() if k not in ("crash_at_step", "debug")})
    assert (config.clustering, config.ci_normalisation) == ("paper", "reference")  # defaults: paper
    with pytest.raises(UsageError, match="--clustering: invalid choice: 'authors'"):
        build_train_parser().parse_args([*base, "--clustering", "authors"])
