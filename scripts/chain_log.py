"""One training log and one learning curve for a backbone trained in stages (a run, then runs that
continue it with ``train.py --init-from``): the stages' ``log.jsonl`` rows in order, each tagged with
its ``stage`` and its ``chain_step`` (steps since the first stage's step 0).

    python scripts/chain_log.py --stage G=runs/G-mini-mild:12800 --stage L2=runs/L2-builtin-160 \
        --stage L3=runs/L3-L2-160 --stage L3G=runs/L3G-L3-160-grey --stage L4G=runs/L4G-L3G-160-grey \
        --out cribo/weights/builtin_train_log.jsonl --plot docs/builtin_training_curves.png

``NAME=PATH[:LAST]``: PATH is a run folder (its ``log.jsonl``) or a log file; LAST, the step the next
stage started from (rows after it are dropped; default: the log's last step).

The probe is small (64 support / 60 query scenes) and saturates; ``--full WHERE=MIOU`` adds the full
protocol's 1/8 results to the probe panel (WHERE: a stage name, meaning its last step, or a chain
step), ``--goal MIOU`` a dashed line, ``--images-per-step B`` a top axis in images seen:

    python scripts/chain_log.py --stage ... --plot docs/builtin_training_curves.png \
        --full 0=4.8 --full G=8.9 --full L6G=16.6 --goal 20.8 --images-per-step 32
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_stage(spec: str) -> tuple[str, list[dict], int]:
    name, _, rest = spec.partition("=")
    path, _, last = rest.partition(":")
    log = Path(path) / "log.jsonl" if Path(path).is_dir() else Path(path)
    if not name or not log.is_file():
        raise SystemExit(f"--stage {spec!r}: expected NAME=RUN_DIR[:LAST] or NAME=LOG.jsonl[:LAST] with an existing log")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and ("loss" in r or "eval_miou" in r)]
    end = int(last) if last else max(r["step"] for r in rows)
    return name, [r for r in rows if r["step"] <= end], end


def chain(specs: list[str]) -> tuple[list[dict], list[tuple[str, int, int]]]:
    """Rows tagged with stage and chain_step; and (name, first chain step, last chain step) per stage."""
    out, spans, offset = [], [], 0
    for spec in specs:
        name, rows, end = read_stage(spec)
        out += [{**r, "stage": name, "chain_step": offset + r["step"]} for r in rows]
        spans.append((name, offset, offset + end))
        offset += end
    return out, spans


def full_points(specs: list[str], spans: list[tuple[str, int, int]]) -> list[tuple[int, float]]:
    """``WHERE=MIOU`` -> (chain step, mIoU); WHERE is a stage name (its last step) or a chain step."""
    ends = {name: end for name, _, end in spans}
    points = []
    for spec in specs:
        where, _, value = spec.partition("=")
        if where not in ends and not where.isdigit():
            raise SystemExit(f"--full {spec!r}: WHERE must be a stage name ({', '.join(ends)}) or a chain step")
        try:
            points.append((ends[where] if where in ends else int(where), float(value)))
        except ValueError:
            raise SystemExit(f"--full {spec!r}: expected WHERE=MIOU with a number, e.g. L6G=16.6") from None
    return sorted(points)


def plot(rows: list[dict], spans: list[tuple[str, int, int]], path: str, full: list[tuple[int, float]] = (),
         goal: float | None = None, images_per_step: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for name, start, end in spans:
        ev = [(r["chain_step"], r["eval_miou"]) for r in rows if r["stage"] == name and "eval_miou" in r]
        if ev:
            axes[0].plot(*zip(*ev), marker=".", label=name)
        for ax, key in zip(axes[1:], ("loss_global", "bootstrap_ratio")):
            tr = [r for r in rows if r["stage"] == name and key in r]
            ys = [r[key] for r in tr]
            smooth = [sum(ys[max(0, i - 19): i + 1]) / len(ys[max(0, i - 19): i + 1]) for i in range(len(ys))]
            ax.plot([r["chain_step"] for r in tr], smooth, label=name)
        for ax in axes:
            ax.axvline(start, color="grey", lw=0.5, ls=":")
    if full:
        axes[0].plot(*zip(*full), "ks-", ms=5, lw=1, label="full protocol (500 / 300 scenes, 5 seeds)")
    if goal is not None:
        axes[0].axhline(goal, color="k", ls="--", lw=0.8, label=f"goal {goal:g}")
    if images_per_step:
        top = axes[0].secondary_xaxis("top", functions=(lambda s: s * images_per_step / 1e6,
                                                         lambda m: m * 1e6 / images_per_step))
        top.set_xlabel("images seen (millions)")
    titles = ("mIoU at 1/8, held-out scenes (dots: the probe, 64 / 60 scenes)", "L_cv^g (20-row mean)", "bootstrapping ratio")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step since random init")
        ax.grid(alpha=0.3)
    if goal is not None:  # room above the goal line for the legend
        axes[0].set_ylim(top=goal + 0.45 * (goal - axes[0].get_ylim()[0]))
    axes[0].legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", action="append", required=True, metavar="NAME=PATH[:LAST]")
    ap.add_argument("--out", required=True, help="the combined JSON-lines log")
    ap.add_argument("--plot", help="also draw the curves here (PNG)")
    ap.add_argument("--full", action="append", default=[], metavar="WHERE=MIOU",
                    help="a full-protocol result at 1/8 to draw on the probe panel (WHERE: stage name or chain step)")
    ap.add_argument("--goal", type=float, help="a dashed line at this mIoU on the probe panel")
    ap.add_argument("--images-per-step", type=int, help="batch size: adds an images-seen axis")
    args = ap.parse_args()
    rows, spans = chain(args.stage)
    full = full_points(args.full, spans)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, spans, args.plot, full, args.goal, args.images_per_step)
    print(json.dumps({"rows": len(rows), "stages": [{"stage": n, "from": a, "to": b} for n, a, b in spans]}))


if __name__ == "__main__":
    main()
