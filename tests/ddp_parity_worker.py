"""Worker of tests/test_ddp_parity.py: two CrIBo steps on a fixed global batch of 2B images.

    python tests/ddp_parity_worker.py OUT                                   # one process, 2B images
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_parity_worker.py OUT
                                                                            # two gloo processes, B each

Rank r takes images r*B .. (r+1)*B - 1 of the same global batch, so both runs see the same 2B images
in the same order. The clustering is replaced by a fixed assignment per image (every cluster present
in both views of every image), so each process holds the same number of objects; step 1 repeats the
images of step 0, so every object finds its own step-0 copy in the bank (cycle-consistent everywhere)
and both processes count the same Z1, Z2. Under those conditions a 2-process step must equal the
1-process step (module docstring of the test). Rank 0 writes OUT/result.pt (plain tensors).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cribo.pretrain.step as train_step  # noqa: E402
from cribo import dist  # noqa: E402
from cribo.pretrain.config import TrainConfig  # noqa: E402

B, K, IMG, PATCH = 2, 4, 64, 16  # images per process, clusters, view side, patch size
N = (IMG // PATCH) ** 2


def global_batch(world: int) -> tuple[torch.Tensor, ...]:
    """(v1, v2 (2B, 3, S, S), pos1, pos2 (2B, N, 2), labels (2B, 2N)): the same for every run."""
    g = torch.Generator().manual_seed(0)
    n = 2 * B
    v1, v2 = torch.randn(n, 3, IMG, IMG, generator=g), torch.randn(n, 3, IMG, IMG, generator=g)
    c = torch.arange(IMG // PATCH, dtype=torch.float32) * PATCH + PATCH / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (N, 2)
    pos1 = grid.expand(n, N, 2) + torch.rand(n, 1, 2, generator=g) * 40
    pos2 = grid.expand(n, N, 2) * 0.8 + torch.rand(n, 1, 2, generator=g) * 40
    token = torch.arange(2 * N)
    labels = (token[None, :] + torch.arange(n)[:, None] + token[None, :] // N) % K  # all K in both views
    return v1, v2, pos1, pos2, labels


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world, device = dist.init_distributed("cpu")
    cfg = TrainConfig(data="unused", output_dir=str(out), arch="vit_tiny_patch16_224", img_size=IMG, out_dim=64,
                      head_hidden_dim=32, head_bottleneck_dim=16, num_clusters=K, bank_images=16, bank_dtype="fp32",
                      precision="fp32", batch_size=2 * B // world, max_steps=4, warmup_steps=0, ci_start_step=1,
                      freeze_last_layer_steps=0, teacher_temp_warmup_steps=1, clip_grad=0.0, drop_path=0.0,
                      lr=1e-3).resolved(1)
    torch.manual_seed(0)
    trainer = train_step.CrIBoTrainer(cfg, device, world_size=world, ddp=world > 1)
    v1, v2, pos1, pos2, labels = global_batch(world)
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    train_step.joint_space_clustering = lambda *a, **k: labels[mine].clone()  # fixed assignment (docstring)
    result: dict[str, object] = {"world": world}
    for it in range(2):
        stats = trainer.step([v1[mine], v2[mine], pos1[mine], pos2[mine]], it)
        names = ("loss", "loss_global", "loss_object", "loss_cross_image", "bootstrap_ratio")
        local = torch.stack([stats[n].float() for n in names])
        result[f"t{it}_per_rank"] = dist.all_gather_cat(local[None])  # (world, 5)
        result[f"t{it}_stats"] = dist.all_reduce_mean(local)  # what the log reports
        result[f"t{it}_grads"] = {n: p.grad.clone() for n, p in trainer.student.named_parameters()
                                  if p.grad is not None}  # DDP-averaged gradients of this step
        result[f"t{it}_student"] = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        result[f"t{it}_teacher"] = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
        result[f"t{it}_centers"] = torch.cat([trainer.dino_loss.center, trainer.object_loss.center])
        m1, m2, valid = trainer.bank.ordered()
        result[f"t{it}_bank"] = (m1.clone(), m2.clone(), valid.clone())
    if rank == 0:
        torch.save(result, out / "result.pt")
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
