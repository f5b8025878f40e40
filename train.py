"""CrIBo pretraining and backbone export.

    python train.py --data DIR --arch TIMM_NAME --batch-size B --max-steps N --output-dir OUT
                    [--stop-at S] [--seed S] [--preset NAME] [...]
    torchrun --nproc_per_node G train.py ...      (B is per process)
    python train.py export --output-dir OUT       -> OUT/backbone.safetensors + OUT/backbone.json
    python train.py plot --output-dir OUT         -> OUT/training_curves.png (losses, bootstrapping ratio)

Running the same command again resumes from OUT/checkpoint.pth. ``--stop-at S`` checkpoints after
step S and exits 0; run again without it to continue. Unset flags take the preset's value, then the
TrainConfig default (cribo/config.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from cribo.pretrain.clustering import CLUSTERING_MODES
from cribo.pretrain.config import BANK_DTYPES, RECIPES, TEACHER_TARGETS, TrainConfig, config_from_recipe
from cribo.pretrain.losses import CI_NORMALISATIONS
from cribo.pretrain.transforms import AUGMENTATIONS
from cribo.dirswap import check_output_file
from cribo.errors import CliParser, UsageError, run_cli

DEFAULTS = TrainConfig.__dataclass_fields__


def _default(name: str) -> str:
    return f"(default: preset value, else {DEFAULTS[name].default})"


def build_train_parser() -> CliParser:
    p = CliParser(description="CrIBo pretraining (ICLR 2024).", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("run")
    req.add_argument("--data", required=True, help="folder of images (recursive), ImageNet/COCO root, or hf:NAME[:SPLIT]")
    req.add_argument("--data-split", help="split of a recognised layout (default: its training split)")
    req.add_argument("--skip-corrupt", action="store_const", const=True,
                     help="log and skip unreadable images instead of stopping")
    req.add_argument("--arch", help="timm ViT, e.g. vit_small_patch16_224 (required unless the preset sets it)")
    req.add_argument("--batch-size", type=int, required=True, help="images per process")
    req.add_argument("--max-steps", type=int, required=True, help="run length in steps (the schedules span it)")
    req.add_argument("--output-dir", required=True, help="OUT: checkpoint.pth, log.jsonl, config.json")
    req.add_argument("--stop-at", type=int, help="checkpoint after this step and exit 0 (resume by running again)")
    req.add_argument("--seed", type=int, help=_default("seed"))
    req.add_argument("--preset", choices=sorted(RECIPES), help="; ".join(f"{k}: {v.description}" for k, v in RECIPES.items()))
    req.add_argument("--init-from", metavar="CKPT",
                     help="start from the networks and loss centres of this train.py checkpoint (same --arch and "
                          "heads); optimiser, schedules and memory bank start afresh (a curriculum: a second "
                          "recipe continuing a first run); or from a backbone, 'builtin' or an exported "
                          ".safetensors (heads and centres fresh)")
    req.add_argument("--device", help=_default("device") + "; cuda under torchrun uses cuda:LOCAL_RANK")

    net = p.add_argument_group("network")
    net.add_argument("--img-size", type=int, help=_default("img_size"))
    net.add_argument("--drop-path", type=float, help=_default("drop_path"))
    net.add_argument("--out-dim", type=int, help="L prototypes " + _default("out_dim"))
    net.add_argument("--head-hidden-dim", type=int, help=_default("head_hidden_dim"))
    net.add_argument("--head-bottleneck-dim", type=int, help=_default("head_bottleneck_dim"))
    net.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                     help="area range of the two crops, fractions of the image " + _default("crop_scale"))
    net.add_argument("--augment", choices=sorted(AUGMENTATIONS),
                     help="view augmentations (cribo.pretrain.transforms.AUGMENTATIONS): dino (DINO's pair), texture "
                          "(weak blur), mild (weak blur, class-preserving colour changes), colour (weak blur, hue over the whole "
                          "wheel: the views disagree in colour), grey (mild, each view grey with p 0.5), grey-all (mild, every view "
                          "grey: the teacher's views for --augment grey-all --student-augment grey), recolour (mild, each view "
                          "repainted with p 0.5: luma inverted or not, random gamma, a random colour pair), recolour-pair (both "
                          "views of an image repainted alike, p 0.8) " + _default("augment"))
    net.add_argument("--student-augment", choices=sorted(AUGMENTATIONS),
                     help="asymmetric views: the student sees the teacher's crops with these photometric changes "
                          "(e.g. --augment mild --student-augment colour: the teacher clusters and targets views "
                          "of the true colours, the student must predict them from hue-shifted ones) "
                          "(default: the teacher's views)")
    net.add_argument("--teacher-targets", choices=TEACHER_TARGETS,
                     help="with --student-augment: the views the teacher's targets describe. student-views (not in the "
                          "paper): the teacher clusters its own views, whose colours agree, and describes the student's "
                          "views pooled by those clusters " + _default("teacher_targets"))
    net.add_argument("--rotate", type=float, metavar="DEG",
                     help="turn each view's crop window about its centre by an angle drawn in +-DEG degrees, the "
                          "pixels beyond the border mirrored; not in the paper: for data whose objects appear at any "
                          "orientation, so that matching an object's two views rewards orientation-free features "
                          + _default("rotate"))

    cr = p.add_argument_group("CrIBo")
    cr.add_argument("-K", "--num-clusters", type=int, help=_default("num_clusters"))
    cr.add_argument("--lambda-pos", type=float, help=_default("lambda_pos"))
    cr.add_argument("--clustering", choices=CLUSTERING_MODES,
                    help="paper: uniform marginals, per-image cost range; reference: the authors' code "
                         "(size-weighted marginals, batch range; docs/fidelity.md) " + _default("clustering"))
    cr.add_argument("--bank-images", type=int, help="S, images per bank " + _default("bank_images"))
    cr.add_argument("--bank-dtype", choices=BANK_DTYPES, help=_default("bank_dtype"))
    cr.add_argument("--no-cross-image", dest="use_cross_image", action="store_const", const=False,
                    help="ablation: train without L_ci^o")
    cr.add_argument("--ci-normalisation", choices=CI_NORMALISATIONS,
                    help="L_ci^o: paper (each direction by its own count) or reference (both by Z1) "
                         + _default("ci_normalisation"))
    cr.add_argument("--ci-start-epoch", type=float, help=_default("ci_start_epoch"))
    cr.add_argument("--ci-start-step", type=int, help="overrides --ci-start-epoch")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, help="base lr for a global batch of 256 " + _default("lr"))
    opt.add_argument("--min-lr", type=float, help=_default("min_lr"))
    opt.add_argument("--warmup-epochs", type=float, help=_default("warmup_epochs"))
    opt.add_argument("--warmup-steps", type=int, help="overrides --warmup-epochs")
    opt.add_argument("--weight-decay", type=float, help=_default("weight_decay"))
    opt.add_argument("--weight-decay-end", type=float, help=_default("weight_decay_end"))
    opt.add_argument("--momentum-teacher", type=float, help=_default("momentum_teacher"))
    opt.add_argument("--teacher-temp", type=float, help=_default("teacher_temp"))
    opt.add_argument("--warmup-teacher-temp", type=float, help=_default("warmup_teacher_temp"))
    opt.add_argument("--teacher-temp-warmup-epochs", type=float, help=_default("teacher_temp_warmup_epochs"))
    opt.add_argument("--teacher-temp-warmup-steps", type=int, help="overrides --teacher-temp-warmup-epochs")
    opt.add_argument("--student-temp", type=float, help=_default("student_temp"))
    opt.add_argument("--freeze-last-layer-epochs", type=float, help=_default("freeze_last_layer_epochs"))
    opt.add_argument("--freeze-last-layer-steps", type=int, help="overrides --freeze-last-layer-epochs")
    opt.add_argument("--clip-grad", type=float, help="per-parameter norm; 0 disables " + _default("clip_grad"))
    opt.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                     help=_default("precision") + "; auto: bf16 on GPUs and bf16-capable CPUs, else fp32")

    run = p.add_argument_group("logging and checkpoints")
    run.add_argument("--num-workers", type=int, help=_default("num_workers"))
    run.add_argument("--log-every", type=int, help=_default("log_every"))
    run.add_argument("--ckpt-every", type=int, help=_default("ckpt_every"))
    ev = p.add_argument_group("learning curve (k-NN retrieval of the teacher on a fixed labelled subset)")
    ev.add_argument("--eval-every", type=int, help="evaluate at step 0, every N steps and at the end; 0: never "
                                                  + _default("eval_every"))
    ev.add_argument("--eval-data", help="labelled dataset root, e.g. data/synthetic (python -m cribo.synthetic)")
    ev.add_argument("--eval-dataset", choices=("folder", "voc", "ade20k"), help=_default("eval_dataset"))
    ev.add_argument("--eval-train-split", help="split of the support images " + _default("eval_train_split"))
    ev.add_argument("--eval-val-split", help="split of the query images " + _default("eval_val_split"))
    ev.add_argument("--eval-support", type=int, help="support images (the first N) " + _default("eval_support"))
    ev.add_argument("--eval-queries", type=int, help="query images (the first N) " + _default("eval_queries"))

    run.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no tqdm bar")
    run.add_argument("--debug-bank-hash", action="store_const", const=True,
                     help="write OUT/bank_rank{r}.json (fingerprint of each rank's banks) at the end")
    # Test hook: exit abruptly after this step (see cribo.pretrain.loop.train).
    run.add_argument("--crash-at-step", type=int, help=argparse.SUPPRESS)
    return p


def build_export_parser() -> CliParser:
    p = CliParser(prog="train.py export",
                                description="Export the teacher backbone of OUT/checkpoint.pth as "
                                            "OUT/backbone.safetensors + OUT/backbone.json.")
    p.add_argument("--output-dir", required=True, help="the training run's OUT folder")
    p.add_argument("--out", help="target .safetensors (default OUT/backbone.safetensors; its .json goes beside it)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="storage precision of the exported weights (loading casts to fp32)")
    return p


def build_plot_parser() -> CliParser:
    p = CliParser(prog="train.py plot",
                  description="Draw OUT/log.jsonl: losses, bootstrapping ratio, kept clusters and "
                              "the learning curve (eval mIoU vs images seen).")
    p.add_argument("--output-dir", required=True, help="the training run's OUT folder")
    p.add_argument("--out", help="PNG path (default OUT/training_curves.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; a user error prints one line ``error: ...`` (exit 2 arguments, 1 data)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "export":
        args = build_export_parser().parse_args(argv[1:])
        from pathlib import Path

        from cribo.backbones import check_export_target
        from cribo.pretrain.loop import export_teacher
        check_export_target(args.out or Path(args.output_dir) / "backbone.safetensors")
        info = export_teacher(args.output_dir, args.out, dtype=args.dtype)
        print(json.dumps({k: info[k] for k in ("arch", "patch_size", "embed_dim", "sha256", "step", "checkpoint")}))
        return 0
    if argv and argv[0] == "plot":
        args = build_plot_parser().parse_args(argv[1:])
        from pathlib import Path

        from cribo.pretrain.report import plot_training_log
        out = args.out or Path(args.output_dir) / "training_curves.png"
        check_output_file(out, label="--out")
        run = Path(args.output_dir) / "config.json"  # written at the start of the run: the global batch
        batch = json.loads(run.read_text())["global_batch"] if run.is_file() else None
        print(plot_training_log(Path(args.output_dir) / "log.jsonl", out, images_per_step=batch))
        return 0

    args = vars(build_train_parser().parse_args(argv))
    preset, crash_at_step = args.pop("preset"), args.pop("crash_at_step")
    if args["crop_scale"] is not None:
        args["crop_scale"] = tuple(args["crop_scale"])
    args.pop("debug")  # handled by run_cli
    if args["arch"] is None and not (preset and "arch" in RECIPES[preset].overrides):
        build_train_parser().error("--arch is required (or a --preset that sets it)")
    try:
        config = config_from_recipe(preset, **args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    from cribo.pretrain.loop import check_output_dir, train
    check_output_dir(config.output_dir)  # before any compute
    summary = train(config, crash_at_step=crash_at_step)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
