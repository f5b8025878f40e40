"""Reports of a protocol run: console table, results.json / .csv / .md and a per-class IoU bar chart.

All files are written next to the results JSON path ``out`` (``out.with_suffix(".csv")``, ``.md`` and
``<stem>_per_class_iou.png``), each atomically (:mod:`cribo.io`). The chart is drawn with
matplotlib's object API on an Agg canvas (no global backend switch, no display needed).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from cribo.dirswap import TargetError, check_output_file
from cribo.io import atomic_path, write_json, write_text

__all__ = ["format_table", "format_timing", "write_reports", "report_paths", "chart_ratio", "log_event"]


def log_event(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    """One JSON-lines log record ``{"event": ..., **fields}`` on ``stream`` (default stdout)."""
    print(json.dumps({"event": event, **fields}), file=stream or sys.stdout, flush=True)


def report_paths(out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    return {"json": out, "csv": out.with_suffix(".csv"), "md": out.with_suffix(".md"),
            "png": out.with_name(f"{out.stem}_per_class_iou.png")}


def is_results_file(path: Path) -> bool:
    """True when ``path`` is a results.json this code wrote (a JSON object with ``ratios``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("ratios"), dict)


def check_results_target(out: str | os.PathLike, *, label: str = "--out") -> None:
    """Refuse, before any compute, an ``out`` whose report files would overwrite files this code did
    not write (an earlier results.json of this code and its siblings are replaced)."""
    paths = report_paths(out)
    check_output_file(paths["json"], label=label)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not is_results_file(paths["json"]):
        raise TargetError(f"{label} {out}: writing the results would overwrite "
                          f"{', '.join(str(p) for p in existing)}, not written by evaluate.py; choose another "
                          f"{label} (nothing was changed)")


def _sorted_ratios(results: dict) -> list[str]:
    return sorted(results["ratios"], key=int)


def chart_ratio(results: dict) -> str:
    """The ratio drawn in the per-class chart: the most support data (1 if present, else the smallest n)."""
    return _sorted_ratios(results)[0]


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(results: dict) -> str:
    """Plain-text table: ratio | mIoU mean ± std (percent) | seeds, largest n (least data) first."""
    rows = [("ratio", "mIoU (%) mean ± std", "seeds")]
    for r in reversed(_sorted_ratios(results)):
        e = results["ratios"][r]
        rows.append((f"1/{r}", f"{_fmt(e['mean'])} ± {_fmt(e['std'])}", str(len(e["miou"]))))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def format_timing(results: dict) -> str:
    """One line: where the time went, each phase with its share of ``total`` (``memory``: the Hummingbird
    memory's decoding and augmentation beside its forward)."""
    t = results.get("timing", {})
    keys = [k for k in ("forward", "memory", "search", "vote", "metric", "index_build") if k in t]
    total = t.get("total")
    def share(k: str) -> str:
        if k == "forward" and t.get("forward_cached"):
            return " (cached: spent in an earlier run)"
        return f" ({100 * t[k] / total:.0f} %)" if total else ""

    line = ", ".join(f"{k} {t[k]:.1f} s{share(k)}" for k in keys)
    return line + (f", total {total:.1f} s" if total is not None else "")


def _csv_text(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ratio", "seed", "miou", "pixel_accuracy", "num_support_images", "num_support_patches"])
    for r in _sorted_ratios(results):
        e = results["ratios"][r]
        for j, seed in enumerate(e["seeds"]):
            w.writerow([r, seed, f"{e['miou'][j]:.4f}", f"{e['pixel_accuracy'][j]:.4f}",
                        e["num_support_images"], e["num_support_patches"][j]])
        w.writerow([r, "mean", f"{e['mean']:.4f}", f"{e['pixel_accuracy_mean']:.4f}", e["num_support_images"], ""])
        w.writerow([r, "std", f"{e['std']:.4f}", "", "", ""])
    return buf.getvalue()


def _support_lists_line(lists: list[dict]) -> str:
    return "- support lists: " + ", ".join(f"`{sl['name']}` ({sl['num_ids']} ids, {sl['num_missing']} missing)"
                                           for sl in lists)


def _md_text(results: dict) -> str:
    bb, ds = results.get("backbone", {}), results.get("dataset", {})
    lines = [
        f"# Dense nearest-neighbour retrieval: {ds.get('name', ds.get('kind', '?'))}",
        "",
        f"- backbone: `{bb.get('source', '?')}` ({bb.get('arch', '?')}, identity `{bb.get('identity', '?')}`)",
        f"- support: {ds.get('train_split', '?')} ({ds.get('num_train_images', '?')} images), "
        f"query: {ds.get('val_split', '?')} ({ds.get('num_val_images', '?')} images)",
        f"- k = {results.get('k')}, index `{results.get('index')}`, vote `{results.get('vote')}`, "
        f"level `{results.get('level')}`; std over seeds with ddof = {results.get('std_ddof', 0)}",
        f"- time split: {format_timing(results)}",
        *([_support_lists_line(results["support_lists"])] if results.get("support_lists") else []),
        "",
        "| ratio | mIoU (%) | std | seeds | pixel acc. (%) |",
        "|---|---|---|---|---|",
    ]
    for r in reversed(_sorted_ratios(results)):
        e = results["ratios"][r]
        lines.append(f"| 1/{r} | {_fmt(e['mean'])} | {_fmt(e['std'])} | {len(e['miou'])} | "
                     f"{_fmt(e['pixel_accuracy_mean'])} |")
    names = results.get("class_names", [])
    per_class = results.get("per_class_iou", {})
    ratios = [r for r in reversed(_sorted_ratios(results)) if r in per_class]
    if names and ratios:
        lines += ["", "## Per-class IoU (%), mean over seeds", "",
                  "| class | " + " | ".join(f"1/{r}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for c, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(_fmt(per_class[r][c]) for r in ratios) + " |")
    return "\n".join(lines) + "\n"


def _write_chart(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = chart_ratio(results)
    names = results["class_names"]
    iou = [float("nan") if v is None else v for v in results["per_class_iou"][r]]
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 1.5), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(xs, [0.0 if math.isnan(v) else v for v in iou], color="#4c72b0")
    ax.axhline(results["ratios"][r]["mean"], color="#c44e52", linestyle="--", linewidth=1,
               label=f"mIoU {results['ratios'][r]['mean']:.1f}")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=75, fontsize=7 if len(names) <= 40 else 4)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class IoU at 1/{r} ({results.get('backbone', {}).get('arch', '')}, k={results.get('k')})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png")


def write_reports(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, .csv, .md and the per-class IoU PNG next to ``out``; return the paths."""
    paths = report_paths(out)
    write_json(paths["json"], results)
    write_text(paths["csv"], _csv_text(results))
    write_text(paths["md"], _md_text(results))
    if results.get("class_names") and results.get("per_class_iou"):
        _write_chart(results, paths["png"])
    return paths
