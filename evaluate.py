#!/usr/bin/env python
"""Batch mIoU evaluation: one row of the paper's Table 1 (dense k-NN retrieval, eval-protocol.md).

    python evaluate.py --dataset voc --root /data/voc --backbone vit_small_patch16_224 --random-init \
        --ratios 1,8,64,128 --seeds 5 --k 50 --out results/voc/results.json

One feature extraction per split (cached under --cache-dir, keyed by backbone identity, dataset and
resolution), then every ratio x seed. Writes results.json (+ .csv, .md, _per_class_iou.png beside it),
prints JSON-lines progress and the table. All the work is in :func:`index.protocol.run_protocol`.
"""
from __future__ import annotations

import argparse
import os
import sys

from cribo import dist
from cribo.argtypes import positive_int
from cribo.errors import CliParser, run_cli
from index.bounds import bound_dataset
from index.cli import add_backbone_args, add_data_args, add_extraction_args, add_protocol_args, backbone_from_args
from index.cli import hbird_options_from_args
from index.datasets import DEFAULT_SPLITS, open_dataset
from index.hbird import run_hbird
from index.protocol import LEVELS, VOTES, run_protocol
from index.report import check_results_target, format_table, format_timing
from index.search import SEARCH_KINDS
from index.store import IndexParams
from index.support_lists import read_support_lists


def _ratios(text: str) -> list[int]:
    try:
        ratios = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated integers like 1,8,64,128, got {text!r}")
    if not ratios or min(ratios) < 1:
        raise argparse.ArgumentTypeError(f"--ratios must be integers >= 1, got {text!r}")
    return ratios


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--train-split", help="support split (default: train_aug / training / train)")
    p.add_argument("--val-split", help="query split (default: val / validation / val)")
    add_backbone_args(p, legacy_seed_flag=True)
    p.add_argument("--ratios", type=_ratios, default=[1, 8, 64, 128], help="support ratios 1/n (default 1,8,64,128)")
    p.add_argument("--seeds", type=positive_int, default=5, help="runs per ratio > 1, seeds 0..S-1 (default 5)")
    p.add_argument("--k", type=positive_int, help="neighbours per query patch (default 50; 30 with --protocol hbird)")
    p.add_argument("--index", default="flat", choices=SEARCH_KINDS,
                   help="FAISS index kind (default flat = exact); ivfpq: IVF-PQ codes in RAM with exact re-ranking "
                        "from the memory-mapped features (full-scale support sets); torch: exact search in plain "
                        "torch on --device (chunked matmul + top-k; for a GPU without faiss-gpu)")
    p.add_argument("--nlist", type=positive_int,
                   help="ivf / ivfpq: inverted lists (default: the size rule of index.store.IndexParams / "
                        "index.reranked.default_ivfpq_nlist)")
    p.add_argument("--nprobe", type=positive_int, default=IndexParams.nprobe,
                   help=f"ivf / ivfpq: lists searched per query (default {IndexParams.nprobe}; 16 keeps search + "
                        "vote + metric under a quarter of the forward at 1/128, docs/scale.md)")
    p.add_argument("--vote", default="majority", choices=VOTES, help="label transfer (default majority)")
    p.add_argument("--level", default="patch", choices=LEVELS, help="score patches (paper) or pixels")
    p.add_argument("--support-list", metavar="PATH",
                   help="explicit support ids instead of seeded draws: a text file (one id per line) or a folder "
                        "of them, one per seed (e.g. open-hummingbird-eval's file_sets/voc/1_div_128); "
                        "replaces --ratios/--seeds, results name each list")
    p.add_argument("--allow-missing-ids", action="store_true",
                   help="drop --support-list ids the support split lacks (recorded) instead of stopping")
    p.add_argument("--out", default="results/results.json", help="results JSON; .csv/.md/.png go beside it")
    add_extraction_args(p)
    add_protocol_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; a user error prints one line ``error: ...`` (exit 2 arguments, 1 data)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    train_split = args.train_split or DEFAULT_SPLITS[args.dataset][0]
    val_split = args.val_split or DEFAULT_SPLITS[args.dataset][1]
    check_results_target(args.out)  # before any compute: never overwrite what this tool did not write
    main_rank = True
    try:
        if "WORLD_SIZE" in os.environ:  # launched by torchrun: one process per rank (index.sharded)
            rank, _, device = dist.init_distributed(args.device)
            args.device, main_rank = str(device), rank == 0
        backbone = backbone_from_args(args)
        train_ds = bound_dataset(open_dataset(args.dataset, args.root, train_split), args.max_side,
                                 backbone.patch_size)
        val_ds = bound_dataset(open_dataset(args.dataset, args.root, val_split), args.max_side, backbone.patch_size)
        support_lists = None if args.support_list is None else read_support_lists(
            args.support_list, train_ds.ids, split=train_split, allow_missing=args.allow_missing_ids)
        hbird = hbird_options_from_args(args)
        index_params = IndexParams(nlist=args.nlist, nprobe=args.nprobe)  # ivf / ivfpq knobs, both protocols
        if hbird is not None:
            if (args.vote, args.level) != ("majority", "patch"):
                raise ValueError("--vote/--level belong to the cribo protocol: --protocol hbird always takes the "
                                 "soft vote and scores upsampled pixels (docs/protocols.md)")
            results = run_hbird(
                backbone, train_ds, val_ds, options=hbird, ratios=args.ratios, seeds=args.seeds,
                support_lists=support_lists, k=30 if args.k is None else args.k, index_kind=args.index,
                index_params=index_params, metric=args.metric, score_classes=args.score_classes or "all",
                device=args.device, precision=args.precision, batch_size=args.batch_size, out=args.out)
        else:
            results = run_protocol(
                backbone, train_ds, val_ds, ratios=args.ratios, seeds=args.seeds, k=50 if args.k is None else args.k,
                index_kind=args.index, vote=args.vote, level=args.level, cache_dir=args.cache_dir, device=args.device,
                precision=args.precision, batch_size=args.batch_size, num_workers=args.workers, out=args.out,
                support_lists=support_lists, metric=args.metric, score_classes=args.score_classes or "present",
                index_params=index_params,
            )
    finally:
        dist.destroy()
    if main_rank:
        print(format_table(results))
        print(f"time split: {format_timing(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
