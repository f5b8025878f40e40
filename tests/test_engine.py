"""The training engine: one step's gradients and EMA, the log contract, config, sampling and export.

Tiny everything: ViT-Ti/16 at 64 px (16 patches per view), L = 64, K = 4, batches of 2-4.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.backbones import load_backbone
from cribo.pretrain.config import RECIPES, TrainConfig, config_from_recipe
from cribo.pretrain.loop import LOG_KEYS, LOG_NAME, ResumableSampler, SeededSamples, export_teacher, train, truncate_log
from cribo.pretrain.step import CrIBoTrainer, Schedules, clip_gradients_, ema_update_, param_groups

TINY = dict(arch="vit_tiny_patch16_224", img_size=64, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
            num_clusters=4, bank_images=8, precision="fp32", num_workers=0, progress=False, lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_images(root: Path, n: int = 8, seed: int = 0) -> Path:
    """n images of assorted sizes (coloured rectangles on a background, mild noise) in a nested folder."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(64, 96)), int(rng.integers(64, 96))
        img = np.empty((h, w, 3), dtype=np.int16)
        img[:] = rng.integers(0, 256, 3)
        for _ in range(3):
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            img[y:y + h // 2, x:x + w // 2] = rng.integers(0, 256, 3)
        img += rng.integers(-10, 11, img.shape, dtype=np.int16)
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(sub / f"img{i}.png")
    return root


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    values = dict(TINY, data=str(make_images(tmp_path / "data")), output_dir=str(tmp_path / "out"), batch_size=2,
                  max_steps=4, log_every=2, warmup_steps=1, freeze_last_layer_steps=1, ci_start_step=2,
                  teacher_temp_warmup_steps=2)
    values.update(kw)
    return TrainConfig(**values)


def random_batch(B: int, img_size: int = 64, patch: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Two random views and their patch centres on a shared, shifted grid (as a crop would give)."""
    g = torch.Generator().manual_seed(seed)
    side = img_size // patch
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() * patch + patch / 2
    return [torch.randn(B, 3, img_size, img_size, generator=g), torch.randn(B, 3, img_size, img_size, generator=g),
            grid.expand(B, -1, -1).clone(), (grid + 5.0).expand(B, -1, -1).clone()]


def resolved(**kw) -> TrainConfig:
    values = dict(TINY, data="unused", output_dir="unused", batch_size=2, max_steps=4, warmup_steps=0,
                  freeze_last_layer_steps=0, ci_start_step=0, teacher_temp_warmup_steps=1)
    values.update(kw)
    return TrainConfig(**values).resolved(epoch_steps=4)


# ------------------------------------------------------------------------------------- the run
def test_run_writes_log_rows_with_every_key(tmp_path):
    c = tiny_config(tmp_path, max_steps=5, log_every=2)
    summary = train(c)
    assert summary["step"] == 5 and summary["epoch_steps"] == 4  # 8 images // batch 2
    rows = [json.loads(line) for line in (tmp_path / "out" / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every log_every steps, and the last step
    for r in rows:
        assert set(r) == set(LOG_KEYS)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values())
        assert r["loss"] == pytest.approx(r["loss_global"] + r["loss_object"] + r["loss_cross_image"], rel=1e-5)
        assert 0 <= r["kept_clusters"] <= 4 and 0 <= r["bootstrap_ratio"] <= 1
        assert r["peak_mem_mb"] > 0 and r["time_step"] > 0
    # ci_start_step=2: the row of step 2 (iteration 1) has no cross-image term yet; later rows do.
    assert rows[0]["loss_cross_image"] == 0 and rows[0]["bootstrap_ratio"] == 0
    for r in rows[1:]:  # live from then on: the term is non-zero exactly when some pair is cycle-consistent
        assert (r["loss_cross_image"] > 0) == (r["bootstrap_ratio"] > 0)
    assert rows[2]["epoch"] == 1  # step 5 is the first step of the second pass over 8 images
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["epoch_steps"] == 4 and cfg["config"]["ci_start_step"] == 2


def test_cross_image_ablation_keeps_the_term_at_zero(tmp_path):
    train(tiny_config(tmp_path, use_cross_image=False, max_steps=4, log_every=1))
    rows = [json.loads(line) for line in (tmp_path / "out" / LOG_NAME).read_text().splitlines()]
    assert [r["loss_cross_image"] for r in rows] == [0.0] * 4
    assert [r["bootstrap_ratio"] for r in rows] == [0.0] * 4


# ------------------------------------------------------------------------------------- one step
def test_student_gets_every_gradient_and_teacher_none():
    torch.manual_seed(0)
    trainer = CrIBoTrainer(resolved(), torch.device("cpu"))
    batch = random_batch(3)
    trainer.forward(batch, 0)  # fills the bank so the cross-image term is live at the next step
    out = trainer.forward(random_batch(3, seed=1), 1)
    out["loss"].backward()
    for name, p in trainer.student.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and (p.grad != 0).any(), name
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())


def test_a_batch_seen_before_retrieves_itself_cycle_consistently():
    """Query before push: a batch pushed at one step and shown again (same teacher, same clustering
    seeds) finds its own objects in the banks, and every kept object is cycle-consistent, so the
    bootstrap ratio is kept/K and the cross-image term is live."""
    torch.manual_seed(0)
    trainer = CrIBoTrainer(resolved(), torch.device("cpu"))
    batch = random_batch(3)
    trainer.cluster_generator.manual_seed(5)
    first = trainer.forward(batch, 0)  # empty banks: nothing to retrieve, then this batch is pushed
    assert first["bootstrap_ratio"] == 0 and first["loss_cross_image"] == 0
    assert len(trainer.bank) == 3
    trainer.cluster_generator.manual_seed(5)
    again = trainer.forward(batch, 0)
    assert again["kept_clusters"] > 0
    assert again["bootstrap_ratio"].item() == pytest.approx(again["kept_clusters"].item() / 4)
    assert again["loss_cross_image"] > 0
    assert len(trainer.bank) == 6


def _step_outputs(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    trainer = CrIBoTrainer(resolved(), torch.device("cpu"))
    trainer.cluster_generator.manual_seed(5)
    torch.manual_seed(1)  # drop path
    out = trainer.forward(batch, 0)
    return {**out, "global_center": trainer.dino_loss.center.clone()}


def test_student_views_feed_the_student_and_only_the_student():
    """A batch of 6 (--student-augment): the teacher (clusters, targets, centres) sees views 1-2, the
    student the last two. Student views equal to the teacher's give the 4-tensor step bitwise;
    other student views change the losses but nothing the teacher computed."""
    batch = random_batch(3)
    four = _step_outputs(batch)
    same = _step_outputs(batch + [batch[0].clone(), batch[1].clone()])
    for key in ("loss", "loss_global", "loss_object", "kept_clusters", "global_center"):
        assert torch.equal(four[key], same[key]), key
    other = random_batch(3, seed=7)
    asym = _step_outputs(batch + other[:2])
    assert torch.equal(asym["kept_clusters"], four["kept_clusters"])  # the teacher's clustering
    assert torch.equal(asym["global_center"], four["global_center"])  # the teacher's outputs
    assert asym["loss_global"] != four["loss_global"] and asym["loss_object"] != four["loss_object"]
    with pytest.raises(ValueError, match="4 tensors .* or 6"):
        CrIBoTrainer(resolved(), torch.device("cpu")).forward(batch[:3], 0)


def test_targets_from_student_views_keep_the_teachers_clusters_and_describe_the_student_views():
    """--teacher-targets student-views: the clustering (kept objects) is the teacher views'; the targets
    (global centre) are the student views'; with student views equal to the teacher's, the plain step."""
    import dataclasses as dc
    batch, other = random_batch(3), random_batch(3, seed=7)

    def outputs(b, **kw):
        torch.manual_seed(0)
        trainer = CrIBoTrainer(resolved(**kw), torch.device("cpu"))
        trainer.cluster_generator.manual_seed(5)
        torch.manual_seed(1)
        out = trainer.forward(b, 0)
        return {**out, "global_center": trainer.dino_loss.center.clone()}

    kw = dict(augment="mild", student_augment="recolour", teacher_targets="student-views")
    four = _step_outputs(batch)
    same = outputs(batch + [batch[0].clone(), batch[1].clone()], **kw)
    for key in ("loss", "loss_global", "loss_object", "kept_clusters", "global_center"):
        assert torch.equal(four[key], same[key]), key
    moved = outputs(batch + other[:2], **kw)
    plain_asym = _step_outputs(batch + other[:2])
    assert torch.equal(moved["kept_clusters"], four["kept_clusters"])  # clustered on the teacher's views
    assert not torch.equal(moved["global_center"], four["global_center"])  # targets from the student's
    assert moved["loss_object"] != plain_asym["loss_object"]
    with pytest.raises(ValueError, match="teacher_targets.*--student-augment"):
        dc.replace(resolved(), teacher_targets="student-views")


def test_a_run_with_student_views_trains_and_names_them_in_its_config(tmp_path):
    summary = train(tiny_config(tmp_path, augment="mild", student_augment="colour", max_steps=2, log_every=1))
    assert summary["step"] == 2
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["config"]["student_augment"] == "colour"


def test_a_run_with_turned_views_trains_and_names_them_in_its_config(tmp_path):
    summary = train(tiny_config(tmp_path, augment="mild", rotate=180.0, max_steps=2, log_every=1))
    assert summary["step"] == 2
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["config"]["rotate"] == 180.0


def test_last_layers_frozen_during_the_first_steps():
    torch.manual_seed(0)
    trainer = CrIBoTrainer(resolved(freeze_last_layer_steps=1), torch.device("cpu"))
    head = trainer.student.head
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.step(random_batch(2), 0)
    after = dict(trainer.student.named_parameters())
    frozen = {n for n in before if ".last_layer_" in n}
    assert frozen == {"head.last_layer_global.weight_v", "head.last_layer_object.weight_v"}
    for n in before:
        changed = not torch.equal(before[n], after[n])
        assert changed != (n in frozen), n
    trainer.step(random_batch(2, seed=1), 1)  # step 2: unfrozen
    assert not torch.equal(before["head.last_layer_global.weight_v"], head.last_layer_global.weight_v)


def test_ema_update_is_the_formula_on_one_step():
    torch.manual_seed(0)
    trainer = CrIBoTrainer(resolved(momentum_teacher=0.9), torch.device("cpu"))
    teacher0 = [p.detach().clone() for p in trainer.teacher.parameters()]
    m = float(trainer.schedules.momentum[0])
    assert m == pytest.approx(0.9)
    trainer.step(random_batch(2), 0)
    for t0, t1, s1 in zip(teacher0, trainer.teacher.parameters(), trainer.student.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s1.detach(), rtol=1e-6, atol=1e-7)
    # the student moved, so the teacher moved by exactly (1 - m) of the gap
    assert any(not torch.equal(a, b) for a, b in zip(teacher0, trainer.teacher.parameters()))


def test_ema_update_exact_values():
    t, s = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([[1.0, 2.0]]))
        s.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema_update_(t, s, 0.75)
    assert t.weight.tolist() == [[1.5, 1.0]]


def test_clip_gradients_per_parameter_exact():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])  # norms 5 and 1
    norms = clip_gradients_([a, b], 2.0)
    assert norms.tolist() == [5.0, 1.0]
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * 2.0 / (5.0 + 1e-6))
    assert b.grad.tolist() == [0.0, 1.0, 0.0]  # below the threshold: untouched (not the global norm)


def test_param_groups_no_weight_decay_on_biases_and_norms():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(net)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_schedules_scale_lr_by_global_batch():
    c = resolved(lr=5e-4, min_lr=1e-6, warmup_steps=2, max_steps=6, momentum_teacher=0.996,
                 teacher_temp_warmup_steps=3)
    s = Schedules.from_config(c, global_batch=512)
    assert s.lr[0] == 0.0 and s.lr[1] == pytest.approx(1e-3)  # 5e-4 * 512 / 256 at the end of warm-up
    assert s.lr[-1] > 1e-6 and s.lr.shape == (6,)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] < 1.0
    assert s.teacher_temp.tolist() == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    assert s.wd[0] == pytest.approx(0.04)


def test_fp16_refused_on_cpu():
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        CrIBoTrainer(resolved(precision="fp16"), torch.device("cpu"))


# ------------------------------------------------------------------------------------- config
def test_config_resolves_epochs_to_steps_and_explicit_steps_win():
    c = TrainConfig(data="d", output_dir="o", batch_size=4, max_steps=100, warmup_epochs=2.5,
                    freeze_last_layer_epochs=1, teacher_temp_warmup_epochs=30, ci_start_epoch=1, ci_start_step=7)
    r = c.resolved(epoch_steps=10)
    assert (r.warmup_steps, r.freeze_last_layer_steps, r.ci_start_step) == (25, 10, 7)
    assert r.teacher_temp_warmup_steps == 300  # longer than the run: the ramp is cut by the schedule
    assert c.resolved(epoch_steps=100).warmup_steps == 100  # capped at max_steps
    with pytest.raises(ValueError, match="resolve"):
        c.identity()


def test_identity_ignores_run_management_but_not_the_method():
    base = resolved()
    assert dataclasses.replace(base, stop_at=2, log_every=1, num_workers=3, ckpt_every=7).identity() == base.identity()
    assert dataclasses.replace(base, lr=1e-4).identity() != base.identity()
    assert base.identity(world_size=2) != base.identity(world_size=1)
    assert dataclasses.replace(base, lr=1e-4).identity_diff(base.to_dict()) == ["lr"]
    assert TrainConfig.from_dict(base.to_dict()) == base


def test_a_field_added_later_leaves_older_identities_alone():
    """student_augment at its default (None) is not in the fingerprint, so a run started before the
    field existed (its stored config lacks the key) resumes; set, it is part of the identity."""
    base = resolved()
    old = {k: v for k, v in base.to_dict().items() if k != "student_augment"}
    assert TrainConfig.from_dict(old).identity() == base.identity() and base.identity_diff(old) == []
    asym = dataclasses.replace(base, student_augment="colour")
    assert asym.identity() != base.identity() and asym.identity_diff(old) == ["student_augment"]
    with pytest.raises(ValueError, match="student_augment='nope'.*choose one of"):
        dataclasses.replace(base, student_augment="nope")
    old = {k: v for k, v in base.to_dict().items() if k != "rotate"}
    assert TrainConfig.from_dict(old).identity() == base.identity() and base.identity_diff(old) == []
    assert dataclasses.replace(base, rotate=90.0).identity_diff(old) == ["rotate"]
    with pytest.raises(ValueError, match="rotate=-5.0.*in \\[0, 180\\]"):
        dataclasses.replace(base, rotate=-5.0)


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="batch_size.*positive"):
        TrainConfig(data="d", output_dir="o", batch_size=0, max_steps=1)
    with pytest.raises(ValueError, match="stop_at"):
        TrainConfig(data="d", output_dir="o", batch_size=1, max_steps=4, stop_at=5)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        config_from_recipe("nope", batch_size=1, max_steps=1)


def test_presets_carry_the_paper_hyperparameters():
    assert set(RECIPES) >= {"in1k-vits16", "in1k-vitb16", "coco-vits16", "cpu-tiny"}
    coco = config_from_recipe("coco-vits16", data="d", output_dir="o", batch_size=64, max_steps=10)
    assert (coco.num_clusters, coco.lambda_pos, coco.bank_images, coco.out_dim) == (64, 2.0, 25000, 65536)
    vitb = config_from_recipe("in1k-vitb16", data="d", output_dir="o", batch_size=64, max_steps=10, lr=1e-4)
    assert (vitb.arch, vitb.clip_grad, vitb.min_lr, vitb.lr) == ("vit_base_patch16_224", 0.3, 2e-6, 1e-4)


# ------------------------------------------------------------------------------------- data
def test_resumable_sampler_resumes_inside_the_epoch_and_shards_ranks():
    data = list(range(10))
    full = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
    full.set_position(epoch=2, start=0)
    keys = list(full)
    assert sorted(i for _, i in keys) == data and {e for e, _ in keys} == {2}
    full.set_position(epoch=2, start=4)
    assert list(full) == keys[4:] and len(full) == 6
    full.set_position(epoch=3, start=0)
    assert [i for _, i in full] != [i for _, i in keys]  # a new permutation each epoch
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_position(epoch=2, start=0)
    shards = [[i for _, i in s] for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0]) & set(shards[1])


def test_seeded_samples_are_a_function_of_seed_epoch_index():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    ds = SeededSamples(Noise(), seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ds[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(ds[(0, 1)], a)
    assert not torch.equal(ds[(1, 1)], a) and not torch.equal(SeededSamples(Noise(), seed=1)[(0, 1)], a)


def test_truncate_log_drops_later_rows_and_a_torn_tail(tmp_path):
    log = tmp_path / LOG_NAME
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_log(log, 2) == 2
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RuntimeError, match="line 2 is not JSON"):
        truncate_log(log, 5)


# ------------------------------------------------------------------------------------- export
def test_export_loads_without_a_name_and_matches_the_teacher(tmp_path):
    c = tiny_config(tmp_path, max_steps=2, log_every=1)
    train(c)
    info = export_teacher(c.output_dir)
    path = Path(c.output_dir) / "backbone.safetensors"
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert (info["arch"], info["step"], info["img_size"]) == ("vit_tiny_patch16_224", 2, 64)
    backbone = load_backbone(weights=str(path))
    ckpt = torch.load(Path(c.output_dir) / "checkpoint.pth", weights_only=True)
    teacher = {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    for k, v in backbone.vit.state_dict().items():
        assert torch.equal(v, teacher[k]), k
