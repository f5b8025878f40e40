"""Start the CrIBo app: ``python app.py [--backbone NAME] [--weights FILE] [--index DIR] [--port N]``.

With no argument: the built-in backbone (``cribo/weights/builtin.safetensors``) and a support set of
generated scenes whose index is built on first start (cached in ``.cache/builtin-support``).
Serves on 127.0.0.1 only; ``--share`` asks Gradio for a public link.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import app
from app.state import DEFAULT_CACHE
from cribo.argtypes import DeprecatedFlag, non_negative_int, positive_int
from cribo.errors import CliParser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=None,
                   help="builtin (default without --weights), a timm arch (e.g. vit_small_patch16_224) or a preset")
    p.add_argument("--weights", default=None, help="backbone weights file (our export is self-describing)")
    p.add_argument("--random-init", action="store_true", help="the --backbone arch freshly initialised (seeded)")
    p.add_argument("--init-seed", dest="init_seed", type=non_negative_int, default=0, help="seed of --random-init")
    p.add_argument("--seed", dest="init_seed", type=non_negative_int, action=DeprecatedFlag, new_flag="--init-seed")
    p.add_argument("--index", default=None, help="default support index: a directory written by build_index.py "
                                                 "(default: the built-in generated scenes)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="built-in support scenes, their index and feature caches")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=positive_int, default=None,
                   help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--max-side", type=positive_int, default=1024,
                   help="larger uploads are downscaled to this longer side")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                   help="uploads above this many pixels are refused")
    args = p.parse_args(argv)
    if args.backbone is None and args.weights is None:
        args.backbone = "builtin"
    if args.random_init and args.weights:
        p.error("--random-init and --weights exclude each other")
    return args


def main(argv: list[str] | None = None) -> int:
    """Serve until stopped; a user error prints one line ``error: ...`` (exit 2 arguments, 1 data)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    a = parse_args(argv)
    config = app.AppConfig(backbone=a.backbone, weights=a.weights, random_init=a.random_init, seed=a.init_seed,
                           index=a.index, cache_dir=a.cache_dir, device=a.device, max_side=a.max_side,
                           max_pixels=a.max_pixels)
    app.launch(config, host=a.host, port=a.port, share=a.share)  # StartupError: one line, exit 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
