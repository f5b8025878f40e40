"""Figures of a training run, drawn from ``OUT/log.jsonl``.

``plot_training_log`` draws the loss terms, the bootstrapping ratio ((Z1 + Z2) / 2K, paper Fig. 6),
the mean number of kept clusters against the step and, when the run was evaluated (``--eval-every``),
the learning curve: k-NN retrieval mIoU and the patch-NN rate of the teacher against the images seen,
on a matplotlib Agg canvas (no display needed). A log holds two kinds of rows: training rows (with
``loss``) and evaluation rows (with ``eval_miou``).
"""
from __future__ import annotations

import os
from pathlib import Path

from cribo.io import atomic_path
from cribo.jsonl import JsonlError, read_jsonl


def read_log(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines training log; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}: pass the run's OUT/log.jsonl")
    try:
        rows = [row for _, row in read_jsonl(path)]
    except JsonlError as e:
        raise ValueError(f"{e.path}:{e.line} is not a JSON object ({e.reason}); is this a CrIBo log.jsonl?") from e
    if not rows:
        raise ValueError(f"{path} has no rows yet: the run logs every --log-every steps")
    return rows


def plot_training_log(log_path: str | os.PathLike, out_png: str | os.PathLike, *,
                      images_per_step: int | None = None) -> Path:
    """Write a PNG (losses | bootstrapping ratio | kept clusters [| eval mIoU]) and return its path.

    ``images_per_step`` (the global batch) puts the learning curve against images seen, else steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    all_rows = read_log(log_path)
    rows = [r for r in all_rows if "loss" in r]
    evals = [r for r in all_rows if "eval_miou" in r]
    if not rows:
        raise ValueError(f"{log_path} has no training rows yet: the run logs every --log-every steps")
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(17 if evals else 13, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4 if evals else 3)
    ax_loss, ax_boot, ax_k = axes[:3]
    if evals:
        x = [r["step"] * (images_per_step or 1) for r in evals]
        ax_eval = axes[3]
        ax_eval.plot(x, [r["eval_miou"] for r in evals], "o-", color="tab:red", label="k-NN mIoU (%)")
        ax_nn = ax_eval.twinx()
        ax_nn.plot(x, [100 * r["eval_patch_nn"] for r in evals], "s--", color="tab:gray", label="patch-NN (%)")
        ax_eval.set(title="learning curve (teacher, k-NN retrieval)",
                    xlabel="images seen" if images_per_step else "step", ylabel="mIoU (%)")
        ax_nn.set_ylabel("patch-NN same class (%)")
        ax_eval.legend(handles=ax_eval.lines + ax_nn.lines, fontsize=8, loc="lower right")
        ax_eval.grid(alpha=0.3)
    for key, label in (("loss", "total"), ("loss_global", "L_cv^g"), ("loss_object", "L_cv^o"),
                       ("loss_cross_image", "L_ci^o")):
        ax_loss.plot(steps, [r[key] for r in rows], label=label)
    ax_loss.set(title="losses", xlabel="step")
    ax_loss.legend(fontsize=8)
    ax_boot.plot(steps, [r["bootstrap_ratio"] for r in rows], color="tab:green")
    ax_boot.set(title="bootstrapping ratio (Z1+Z2)/2K", xlabel="step", ylim=(0, None))
    ax_k.plot(steps, [r["kept_clusters"] for r in rows], color="tab:purple")
    ax_k.set(title="kept clusters per image", xlabel="step", ylim=(0, None))
    for ax in (ax_loss, ax_boot, ax_k):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png
