#!/usr/bin/env python
"""Build a FAISS support index of one dataset split (labelled patches of 1/ratio of its images).

    python build_index.py --dataset voc --root /data/voc --split train_aug --backbone builtin \
        --ratio 8 --support-seed 0 --index flat --out indices/voc-1_8-s0

Writes DIR/index.faiss, DIR/labels.npy and DIR/meta.json atomically; the app and
``index.store.SupportIndex.load(DIR)`` read it. Features are cached under --cache-dir and shared with
evaluate.py. All the work is in :func:`index.protocol.build_support_index`.
"""
from __future__ import annotations

import argparse
import json
import sys

from cribo.argtypes import DeprecatedFlag, non_negative_int, positive_int
from cribo.errors import CliParser, run_cli
from index.bounds import bound_dataset
from index.cli import add_backbone_args, add_data_args, add_extraction_args, backbone_from_args
from index.datasets import DEFAULT_SPLITS, open_dataset
from index.protocol import build_support_index
from index.store import INDEX_KINDS, IndexParams, check_index_target


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--split", help="support split (default: train_aug / training / train)")
    add_backbone_args(p)
    p.add_argument("--ratio", type=positive_int, default=1, help="keep round(N/ratio) images (default 1: all)")
    p.add_argument("--support-seed", dest="support_seed", type=non_negative_int, default=0,
                   help="seed of the support selection (ignored for ratio 1)")
    p.add_argument("--seed", dest="support_seed", type=non_negative_int, action=DeprecatedFlag, new_flag="--support-seed")
    p.add_argument("--index", default="flat", choices=sorted(INDEX_KINDS), help="flat (exact), ivf or hnsw (fp16)")
    p.add_argument("--nlist", type=positive_int, help="ivf lists (default 4*sqrt(n))")
    p.add_argument("--nprobe", type=positive_int, default=IndexParams.nprobe, help="ivf lists searched per query")
    p.add_argument("--ef-search", type=positive_int, default=IndexParams.ef_search, help="hnsw search beam")
    p.add_argument("--out", required=True, help="index directory to write")
    add_extraction_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; a user error prints one line ``error: ...`` (exit 2 arguments, 1 data)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    split = args.split or DEFAULT_SPLITS[args.dataset][0]
    params = IndexParams(nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search, seed=args.support_seed)
    check_index_target(args.out)  # before any compute
    backbone = backbone_from_args(args)
    dataset = bound_dataset(open_dataset(args.dataset, args.root, split), args.max_side, backbone.patch_size)
    index = build_support_index(
        backbone, dataset, ratio=args.ratio, seed=args.support_seed, kind=args.index, cache_dir=args.cache_dir,
        device=args.device, precision=args.precision, params=params, out=args.out,
        batch_size=args.batch_size, num_workers=args.workers,
    )
    print(json.dumps({"event": "index_written", "out": args.out, "kind": index.kind, "ntotal": index.ntotal,
                      "dim": index.dim, "images": len(index.meta["image_ids"]), "search_device": index.search_device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
