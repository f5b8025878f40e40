"""One training log and one learning curve for a backbone trained in stages (a run, then runs that
continue it with ``train.py --init-from``): the stages' ``log.jsonl`` rows in order, each tagged with
its ``stage`` and its ``chain_step`` (steps since the first stage's step 0).

    python scripts/chain_log.py --stage G=runs/G-mini-mild:12800 --stage L2=runs/L2-builtin-160 \
        --stage L3=runs/L3-L2-160 --stage L3G=runs/L3G-L3-160-grey --stage L4G=runs/L4G-L3G-160-grey \
        --out cribo/weights/builtin_train_log.jsonl --plot docs/builtin_training_curves.png

``NAME=PATH[:LAST]``: PATH is a run folder (its ``log.jsonl``) or a log file; LAST, the step the next
stage started from (rows after it are dropped; default: the log's last step).
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


def plot(rows: list[dict], spans: list[tuple[str, int, int]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for name, start, end in spans:
        ev = [(r["chain_step"], r["eval_miou"]) for r in rows if r["stage"] == name and "eval_miou" in r]
        tr = [r for r in rows if r["stage"] == name and "loss" in r]
        if ev:
            axes[0].plot(*zip(*ev), marker=".", label=name)
        for ax, key in zip(axes[1:], ("loss_global", "bootstrap_ratio")):
            ys = [r[key] for r in tr]
            smooth = [sum(ys[max(0, i - 19): i + 1]) / len(ys[max(0, i - 19): i + 1]) for i in range(len(ys))]
            ax.plot([r["chain_step"] for r in tr], smooth, label=name)
        for ax in axes:
            ax.axvline(start, color="grey", lw=0.5, ls=":")
    titles = ("probe mIoU (held-out, 64 support / 60 query scenes, 1/8)", "L_cv^g (20-row mean)", "bootstrapping ratio")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step since random init")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", action="append", required=True, metavar="NAME=PATH[:LAST]")
    ap.add_argument("--out", required=True, help="the combined JSON-lines log")
    ap.add_argument("--plot", help="also draw the curves here (PNG)")
    args = ap.parse_args()
    rows, spans = chain(args.stage)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, spans, args.plot)
    print(json.dumps({"rows": len(rows), "stages": [{"stage": n, "from": a, "to": b} for n, a, b in spans]}))


if __name__ == "__main__":
    main()
