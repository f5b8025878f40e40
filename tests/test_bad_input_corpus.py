"""The bad-input corpus: damaged or odd input across the CLIs and the app's upload checks.

Each kind is one parametrised case: it mutates a fresh tiny world (a folder dataset of 6 small images,
exported tiny weights, an index), runs an entry point's ``main(argv)`` in-process, and checks the
outcome: accepted (exit 0, and the output is right) or refused with exactly one ``error: ...`` line
that names the file or argument, the right exit status (2 bad arguments, 1 bad data or state), no
traceback, and nothing that was on disk before changed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import build_index
import evaluate
import train
from app import inputs
from cribo import synthetic
from cribo.backbones import create_vit, export_backbone
from cribo.pretrain.checkpoint import save_checkpoint
from cribo.pretrain.config import TrainConfig
from helpers_data import make_folder_dataset
from index.store import SupportIndex

ARCH = "vit_tiny_patch16_224"
TINY = ["--backbone", ARCH, "--random-init"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The pristine world, copied for every case."""
    world = tmp_path_factory.mktemp("corpus")
    make_folder_dataset(world / "ds", {"train": 4, "val": 2}, sizes=((32, 48), (48, 32)))
    torch.manual_seed(0)
    export_backbone(create_vit(ARCH), ARCH, world / "w" / "tiny.safetensors", {"source": "corpus"})
    assert build_index.main(["--dataset", "folder", "--root", str(world / "ds"), *TINY, "--out", str(world / "idx"),
                             "--cache-dir", str(world / "cache"), "--workers", "0", "--device", "cpu",
                             "--init-seed", "1"]) == 0
    config = TrainConfig(data=str(world / "ds"), arch=ARCH, batch_size=2, max_steps=4, output_dir=str(world / "run"))
    weights = {f"backbone.{k}": v for k, v in create_vit(ARCH).state_dict().items()}
    save_checkpoint(world / "run" / "checkpoint.pth", {"step": 4, "identity": "x", "config": config.to_dict(),
                                                       "teacher": weights})
    (world / "notes").mkdir()
    (world / "notes" / "todo.txt").write_text("mine")
    (world / "afile").write_text("mine")
    (world / "user.safetensors").write_bytes(b"someone else's weights")
    return world


@pytest.fixture
def world(template, tmp_path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(template, w, symlinks=True)
    return w


def snapshot(world: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(world.rglob("*")):
        rel = str(p.relative_to(world))
        if rel.split(os.sep)[0] in ("cache", "appcache"):
            continue  # caches may be written by accepted work
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


# ----------------------------------------------------------------------------------- mutations
def img(world: Path, split: str = "train", j: int = 1) -> Path:
    return world / "ds" / "images" / split / f"{split}_{j:03d}.png"


def mask(world: Path, split: str = "train", j: int = 1) -> Path:
    return world / "ds" / "masks" / split / f"{split}_{j:03d}.png"


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def save_array(path: Path, array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> None:
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(path, format=fmt)


def resize_pair(world: Path, h: int, w: int) -> None:
    save_array(img(world), np.full((h, w, 3), 90, np.uint8))
    save_array(mask(world), np.ones((h, w), np.uint8))


def flip_checkpoint(world: Path) -> None:
    path = world / "run" / "checkpoint.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def poison_checkpoint(world: Path) -> None:
    path = world / "run" / "checkpoint.pth"
    state = torch.load(path, weights_only=True)
    state.pop("format"), state.pop("checksum")
    state["teacher"]["backbone.norm.weight"][0] = float("inf")
    save_checkpoint(path, state)
    (world / "run" / "checkpoint.prev.pth").unlink()


def foreign_link(world: Path) -> None:
    (world / "link").symlink_to(world / "notes")


MUTATIONS: dict[str, Callable[[Path], None]] = {
    "none": lambda w: None,
    "corrupt-image": lambda w: write(img(w), random.Random(1).randbytes(300)),
    "empty-image": lambda w: write(img(w), b""),
    "truncated-image": lambda w: write(img(w), img(w).read_bytes()[:60]),
    "text-as-image": lambda w: write(img(w), b"just some text, not a picture\n"),
    "jpeg-named-png": lambda w: save_array(img(w), np.asarray(Image.open(img(w)).convert("RGB")), fmt="JPEG"),
    "grayscale-image": lambda w: save_array(img(w), np.asarray(Image.open(img(w)).convert("L"))),
    "rgba-image": lambda w: save_array(img(w), np.asarray(Image.open(img(w)).convert("RGBA"))),
    "cmyk-image": lambda w: Image.open(img(w)).convert("RGB").convert("CMYK").save(img(w), format="JPEG"),
    "palette-image": lambda w: Image.open(img(w)).convert("RGB").convert("P").save(img(w)),
    "missing-image": lambda w: img(w).unlink(),
    "missing-mask": lambda w: mask(w).unlink(),
    "extra-mask-without-image": lambda w: shutil.copy(mask(w), mask(w).with_name("train_099.png")),
    "rgb-mask": lambda w: save_array(mask(w), np.stack([np.asarray(Image.open(mask(w)))] * 3, -1)),
    "mask-size-mismatch": lambda w: save_array(mask(w), np.zeros((16, 16), np.uint8)),
    "mask-unknown-class": lambda w: save_array(mask(w), np.full((48, 32), 7, np.uint8)),
    "corrupt-mask": lambda w: write(mask(w), random.Random(2).randbytes(200)),
    "empty-mask": lambda w: write(mask(w), b""),
    "all-void-mask": lambda w: save_array(mask(w), np.full((48, 32), 255, np.uint8)),
    "every-mask-void": lambda w: [save_array(mask(w, "train", j), np.full(Image.open(mask(w, "train", j)).size[::-1],
                                                                         255, np.uint8)) for j in range(4)],
    "image-smaller-than-a-patch": lambda w: resize_pair(w, 8, 40),
    "image-too-large": lambda w: resize_pair(w, 20, 4200),
    "missing-classes-file": lambda w: (w / "ds" / "classes.txt").unlink(),
    "empty-classes-file": lambda w: write(w / "ds" / "classes.txt", b""),
    "empty-split": lambda w: [p.unlink() for p in (w / "ds" / "images" / "train").iterdir()],
    "weights-random-bytes": lambda w: write(w / "w" / "tiny.safetensors", random.Random(3).randbytes(1000)),
    "weights-truncated": lambda w: write(w / "w" / "tiny.safetensors", (w / "w" / "tiny.safetensors").read_bytes()[:5000]),
    "weights-tampered": lambda w: write(w / "w" / "tiny.safetensors",
                                        (w / "w" / "tiny.safetensors").read_bytes()[:-8] + b"\x00" * 8),
    "weights-pickle-object": lambda w: torch.save({"x": Path("evil")}, w / "w" / "evil.pth"),
    "checkpoint-flipped": flip_checkpoint,
    "checkpoint-flipped-no-predecessor": flip_checkpoint,
    "checkpoint-random-bytes": lambda w: write(w / "run" / "checkpoint.pth", random.Random(4).randbytes(2000)),
    "checkpoint-truncated": lambda w: write(w / "run" / "checkpoint.pth",
                                            (w / "run" / "checkpoint.pth").read_bytes()[:3000]),
    "checkpoint-non-finite": poison_checkpoint,
    "index-missing-labels": lambda w: (w / "idx" / "labels.npy").unlink(),
    "index-corrupt-faiss": lambda w: write(w / "idx" / "index.faiss", b"garbage"),
    "index-bad-meta": lambda w: write(w / "idx" / "meta.json", b"{not json"),
    "index-extra-file": lambda w: write(w / "idx" / "my-notes.md", b"mine"),
    "foreign-symlink": foreign_link,
    "users-log": lambda w: write(w / "notes" / "log.jsonl", b"my log\n"),
    "users-results-md": lambda w: ((w / "res").mkdir(), write(w / "res" / "results.md", b"my notes")),
    "results-present": lambda w: ((w / "res").mkdir(), write(w / "res" / "results.json", b'{"ratios": {}}\n'),
                                  write(w / "res" / "results.md", b"old table")),
}


# ----------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    kind: str
    mutate: str
    cli: str                 # build_index | evaluate | train | export | plot | synthetic | app
    args: tuple[str, ...]    # "{w}" is replaced by the world's path
    code: int                # expected exit status
    says: str = ""           # a substring of the one error line (names the file or argument)
    images: int | None = None  # accepted build_index cases: support images in the written index


def B(*extra: str, out: str = "{w}/out") -> tuple[str, ...]:
    return ("--dataset", "folder", "--root", "{w}/ds", *TINY, "--out", out, "--cache-dir", "{w}/cache",
            "--workers", "0", "--device", "cpu", *extra)


def E(*extra: str, out: str = "{w}/res/results.json", backbone: tuple[str, ...] = tuple(TINY)) -> tuple[str, ...]:
    return ("--dataset", "folder", "--root", "{w}/ds", *backbone, "--ratios", "1", "--seeds", "1", "--k", "5",
            "--out", out, "--cache-dir", "{w}/cache", "--workers", "0", "--device", "cpu", *extra)


def T(*extra: str, out: str = "{w}/trun") -> tuple[str, ...]:
    return ("--data", "{w}/ds/images/train", "--arch", ARCH, "--batch-size", "2", "--max-steps", "2",
            "--output-dir", out, "--img-size", "32", "--out-dim", "16", "--head-hidden-dim", "16",
            "--head-bottleneck-dim", "8", "-K", "2", "--bank-images", "4", "--num-workers", "0", "--no-progress",
            *extra)


W = ("--weights", "{w}/w/tiny.safetensors")
A = ("--backbone", ARCH, "--random-init", "--index", "{w}/idx", "--cache-dir", "{w}/appcache")

CASES = [
    # accepted odd inputs (exit 0)
    Case("baseline", "none", "build_index", B(), 0, images=4),
    Case("jpeg-bytes-in-a-png-file", "jpeg-named-png", "build_index", B(), 0),
    Case("grayscale-image", "grayscale-image", "build_index", B(), 0),
    Case("rgba-image", "rgba-image", "build_index", B(), 0),
    Case("cmyk-image", "cmyk-image", "build_index", B(), 0),
    Case("palette-image", "palette-image", "build_index", B(), 0),
    Case("extra-mask-without-image", "extra-mask-without-image", "build_index", B(), 0, images=4),
    Case("one-all-void-mask", "all-void-mask", "build_index", B(), 0),
    Case("large-image-with-max-side", "image-too-large", "build_index", B("--max-side", "256"), 0),
    Case("existing-index-replaced", "none", "build_index", B(out="{w}/idx"), 0),
    Case("exported-weights", "none", "evaluate", E(backbone=W), 0),
    # damaged images and masks (exit 1, the file named)
    Case("corrupt-image", "corrupt-image", "build_index", B(), 1, "train_001.png"),
    Case("corrupt-image-in-a-worker", "corrupt-image", "build_index", B("--workers", "1"), 1, "train_001.png"),
    Case("empty-image", "empty-image", "build_index", B(), 1, "train_001.png"),
    Case("truncated-image", "truncated-image", "build_index", B(), 1, "train_001.png"),
    Case("text-as-image", "text-as-image", "evaluate", E(), 1, "train_001.png"),
    Case("mask-without-image-is-not-an-id", "missing-image", "build_index", B(), 0, images=3),
    Case("missing-mask", "missing-mask", "build_index", B(), 1, "train_001"),
    Case("rgb-mask", "rgb-mask", "build_index", B(), 1, "train_001.png"),
    Case("rgb-mask-in-a-worker", "rgb-mask", "evaluate", E("--workers", "1"), 1, "train_001.png"),
    Case("mask-size-mismatch", "mask-size-mismatch", "build_index", B(), 1, "train_001.png"),
    Case("mask-unknown-class", "mask-unknown-class", "build_index", B(), 1, "train_001.png"),
    Case("corrupt-mask", "corrupt-mask", "build_index", B(), 1, "train_001.png"),
    Case("empty-mask", "empty-mask", "evaluate", E(), 1, "train_001.png"),
    Case("every-support-mask-void", "every-mask-void", "build_index", B(), 2, "no labelled patch"),
    Case("image-smaller-than-a-patch", "image-smaller-than-a-patch", "build_index", B(), 1, "train_001.png"),
    Case("image-too-large", "image-too-large", "evaluate", E(), 1, "train_001.png"),
    Case("missing-classes-file", "missing-classes-file", "build_index", B(), 1, "classes.txt"),
    Case("empty-classes-file", "empty-classes-file", "build_index", B(), 1, "class"),
    Case("empty-split", "empty-split", "build_index", B(), 1, "train"),
    # arguments out of range (exit 2, the argument named)
    Case("root-missing", "none", "build_index", ("--dataset", "folder", "--root", "{w}/nowhere", *TINY, "--out", "{w}/o"), 2, "--root"),
    Case("root-is-a-file", "none", "evaluate", ("--dataset", "folder", "--root", "{w}/afile", *TINY), 1, "afile"),
    Case("seed-negative", "none", "build_index", B("--seed", "-1"), 2, "--seed"),
    Case("seed-not-a-number", "none", "build_index", B("--seed", "abc"), 2, "--seed"),
    Case("ratio-zero", "none", "build_index", B("--ratio", "0"), 2, "--ratio"),
    Case("ratio-keeps-no-image", "none", "build_index", B("--ratio", "1000"), 2, "ratio 1/1000"),
    Case("nlist-zero", "none", "build_index", B("--nlist", "0"), 2, "--nlist"),
    Case("nprobe-zero", "none", "build_index", B("--nprobe", "0"), 2, "--nprobe"),
    Case("ef-search-zero", "none", "build_index", B("--ef-search", "0"), 2, "--ef-search"),
    Case("batch-size-zero", "none", "build_index", B("--batch-size", "0"), 2, "--batch-size"),
    Case("workers-negative", "none", "build_index", B("--workers", "-1"), 2, "--workers"),
    Case("init-seed-negative", "none", "build_index", B("--init-seed", "-1"), 2, "--init-seed"),
    Case("max-side-zero", "none", "build_index", B("--max-side", "0"), 2, "--max-side"),
    Case("unknown-index-kind", "none", "build_index", B("--index", "lsh"), 2, "--index"),
    Case("k-zero", "none", "evaluate", E("--k", "0"), 2, "--k"),
    Case("k-above-support", "none", "evaluate", E("--k", "100000"), 2, "k"),
    Case("seeds-zero", "none", "evaluate", E("--seeds", "0"), 2, "--seeds"),
    Case("ratios-zero", "none", "evaluate", E("--ratios", "0"), 2, "--ratios"),
    Case("unknown-backbone", "none", "evaluate", E(backbone=("--backbone", "vit_huge_patch99")), 2, "vit_huge_patch99"),
    Case("train-seed-negative", "none", "train", T("--seed", "-1"), 2, "seed"),
    Case("train-batch-size-zero", "none", "train", T("--batch-size", "0"), 2, "batch_size"),
    Case("train-max-steps-zero", "none", "train", T("--max-steps", "0"), 2, "max_steps"),
    Case("train-negative-lr", "none", "train", T("--lr", "-1"), 2, "lr"),
    Case("train-stop-at-beyond-the-run", "none", "train", T("--stop-at", "9"), 2, "stop_at"),
    Case("train-drop-path-above-one", "none", "train", T("--drop-path", "1.5"), 2, "drop_path"),
    Case("train-zero-teacher-temp", "none", "train", T("--teacher-temp", "0"), 2, "teacher_temp"),
    Case("train-img-size-not-patch-multiple", "none", "train", T("--img-size", "40"), 2, "img_size=40"),
    Case("train-batch-above-dataset", "none", "train", T("--batch-size", "8"), 2, "--batch-size 8"),
    Case("train-no-images", "none", "train", T("--data", "{w}/notes"), 1, "notes"),
    Case("train-corrupt-image", "corrupt-image", "train", T(), 1, "train_001.png"),
    Case("synthetic-zero-images", "none", "synthetic", ("--out", "{w}/syn", "--num-images", "0", "--seed", "0"), 2, "--num-images"),
    Case("synthetic-tiny-size", "none", "synthetic", ("--out", "{w}/syn", "--num-images", "1", "--seed", "0", "--size", "8"), 2, "--size"),
    Case("app-port-zero", "none", "app", (*A, "--port", "0"), 2, "--port"),
    Case("app-max-side-zero", "none", "app", (*A, "--max-side", "0"), 2, "--max-side"),
    Case("app-weights-and-random-init", "none", "app", ("--weights", "x", "--random-init"), 2, "--random-init"),
    # weights, checkpoints, index directories (exit 1, the file named)
    Case("weights-missing", "none", "evaluate", E(backbone=("--weights", "{w}/w/none.safetensors")), 1, "none.safetensors"),
    Case("weights-random-bytes", "weights-random-bytes", "evaluate", E(backbone=W), 1, "tiny.safetensors"),
    Case("weights-truncated", "weights-truncated", "build_index", B()[:4] + W + B()[7:], 1, "tiny.safetensors"),
    Case("weights-tampered", "weights-tampered", "evaluate", E(backbone=W), 1, "tiny.safetensors"),
    Case("weights-wrong-architecture", "none", "evaluate", E(backbone=(*W, "--backbone", "vit_small_patch16_224")), 1,
         "vit_small_patch16_224"),
    Case("weights-pickled-object", "weights-pickle-object", "evaluate",
         E(backbone=("--weights", "{w}/w/evil.pth", "--backbone", ARCH)), 1, "evil.pth"),
    Case("checkpoint-missing", "none", "export", ("--output-dir", "{w}/nowhere"), 1, "checkpoint.pth"),
    Case("checkpoint-random-bytes", "checkpoint-random-bytes", "export", ("--output-dir", "{w}/run"), 1, "checkpoint.pth"),
    Case("checkpoint-truncated", "checkpoint-truncated", "export", ("--output-dir", "{w}/run"), 1, "checkpoint.pth"),
    Case("checkpoint-flipped-byte", "checkpoint-flipped", "export", ("--output-dir", "{w}/run"), 1, "checksum mismatch"),
    Case("checkpoint-non-finite", "checkpoint-non-finite", "export", ("--output-dir", "{w}/run"), 1, "non-finite"),
    Case("checkpoint-damaged-on-resume", "checkpoint-random-bytes", "train", T(out="{w}/run"), 1, "checkpoint.pth"),
    Case("plot-without-log", "none", "plot", ("--output-dir", "{w}/run"), 1, "log.jsonl"),
    Case("index-missing", "none", "app", ("--backbone", ARCH, "--random-init", "--index", "{w}/nowhere"), 1, "nowhere"),
    Case("index-missing-labels", "index-missing-labels", "app", A, 1, "labels.npy"),
    Case("index-corrupt-faiss", "index-corrupt-faiss", "app", A, 1, "index.faiss"),
    Case("index-bad-meta", "index-bad-meta", "app", A, 1, "meta.json"),
    Case("index-of-another-backbone", "none", "app", (*A[:-4], "--seed", "3", *A[-4:]), 1, "built with backbone"),
    # output paths (exit 2, nothing changed)
    Case("out-is-a-file", "none", "build_index", B(out="{w}/afile"), 2, "afile"),
    Case("out-is-someone-elses-folder", "none", "build_index", B(out="{w}/notes"), 2, "notes"),
    Case("out-index-holding-foreign-files", "index-extra-file", "build_index", B(out="{w}/idx"), 2, "my-notes.md"),
    Case("out-foreign-symlink", "foreign-symlink", "build_index", B(out="{w}/link"), 2, "link"),
    Case("out-parent-is-a-file", "none", "build_index", B(out="{w}/afile/idx"), 2, "afile"),
    Case("evaluate-out-is-a-folder", "none", "evaluate", E(out="{w}/notes"), 2, "notes"),
    Case("evaluate-out-parent-is-a-file", "none", "evaluate", E(out="{w}/afile/r.json"), 2, "afile"),
    Case("train-output-dir-is-a-file", "none", "train", T(out="{w}/afile"), 2, "--output-dir"),
    Case("export-out-is-a-folder", "none", "export", ("--output-dir", "{w}/run", "--out", "{w}/notes"), 2, "notes"),
    Case("plot-out-is-a-folder", "none", "plot", ("--output-dir", "{w}/run", "--out", "{w}/notes"), 2, "notes"),
    Case("evaluate-out-would-overwrite-a-users-file", "users-results-md", "evaluate", E(out="{w}/res/results.json"), 2,
         "results.md"),
    Case("evaluate-out-is-a-users-json", "none", "evaluate", E(out="{w}/w/tiny.json"), 2, "tiny.json"),
    Case("export-out-is-a-users-file", "none", "export", ("--output-dir", "{w}/run", "--out", "{w}/user.safetensors"), 2,
         "user.safetensors"),
    Case("export-over-its-own-export", "none", "export", ("--output-dir", "{w}/run", "--out", "{w}/w/tiny.safetensors"), 0),
    Case("evaluate-over-its-own-results", "results-present", "evaluate", E(), 0),
    Case("train-output-dir-of-someone-else", "users-log", "train", T(out="{w}/notes"), 2, "log.jsonl"),
    Case("synthetic-out-is-a-file", "none", "synthetic", ("--out", "{w}/afile", "--num-images", "1", "--seed", "0"), 1, "afile"),
]

ENTRY = {"build_index": build_index.main, "evaluate": evaluate.main, "synthetic": synthetic.main,
         "train": train.main, "export": lambda a: train.main(["export", *a]), "plot": lambda a: train.main(["plot", *a])}


def run_app(argv: list[str], monkeypatch) -> int:
    import app.ui

    def no_server(*a, **k):  # a case that passes the checks must not start a server here
        raise AssertionError("the app would start serving")

    monkeypatch.setattr(app.ui, "build_app", no_server)
    import importlib.util
    spec = importlib.util.spec_from_file_location("app_cli", Path(build_index.__file__).parent / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input(case, world, capsys, monkeypatch):
    MUTATIONS[case.mutate](world)
    if case.kind == "checkpoint-flipped-byte":
        (world / "run" / "checkpoint.prev.pth").unlink(missing_ok=True)
    before = snapshot(world)
    argv = [a.replace("{w}", str(world)) for a in case.args]
    code = run_app(argv, monkeypatch) if case.cli == "app" else ENTRY[case.cli](argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == case.code, err[-2000:]
    if case.code == 0:
        assert errors == []
        if case.images is not None:
            assert len(SupportIndex.load(world / "out").meta["image_ids"]) == case.images
        return
    assert len(errors) == 1, err[-2000:]
    assert case.says in errors[0]
    after = snapshot(world)
    assert {k: after.get(k) for k in before} == before  # nothing that was on disk changed
    assert not [k for k in after if k.endswith((".tmp", ".lnk"))]  # and no temporary file left


def test_corpus_has_at_least_60_kinds():
    assert len({c.kind for c in CASES}) == len(CASES) >= 60


# ----------------------------------------------------------------------------------- app uploads
UPLOADS = {
    "upload-corrupt": (lambda p: write(p, random.Random(5).randbytes(100)), "image", "not a readable image"),
    "upload-empty": (lambda p: write(p, b""), "image", "not a readable image"),
    "upload-text": (lambda p: write(p, b"hello"), "image", "not a readable image"),
    "upload-over-max-pixels": (lambda p: save_array(p, np.zeros((300, 400, 3), np.uint8)), "image", "--max-pixels"),
    "upload-missing": (lambda p: None, "image", "not found"),
    "mask-rgb": (lambda p: save_array(p, np.zeros((4, 6, 3), np.uint8)), "mask", "mode RGB"),
    "mask-wrong-size": (lambda p: save_array(p, np.zeros((5, 6), np.uint8)), "mask", "must have the image's size"),
    "mask-unknown-class": (lambda p: save_array(p, np.full((4, 6), 9, np.uint8)), "mask", "not class ids"),
    "mask-16-bit-values": (lambda p: Image.fromarray(np.full((4, 6), 4000, np.uint16)).save(p), "mask", "0..255"),
}


@pytest.mark.parametrize("kind", sorted(UPLOADS))
def test_bad_upload(kind, tmp_path):
    make, what, says = UPLOADS[kind]
    path = tmp_path / f"{kind}.png"
    make(path)
    with pytest.raises(inputs.InputError, match=says) as e:
        if what == "image":
            inputs.load_image(str(path), max_side=64, max_pixels=100_000)
        else:
            inputs.load_mask(str(path), size=(4, 6), num_classes=4)
    assert path.name in str(e.value) or kind == "upload-missing"
    assert "split" not in str(e.value)  # the app speaks of uploads


def test_accepted_odd_upload_is_downscaled(tmp_path):
    path = tmp_path / "wide.png"
    save_array(path, np.zeros((50, 200), np.uint8))  # grayscale, wider than max_side
    loaded = inputs.load_image(str(path), max_side=64, max_pixels=100_000)
    assert loaded.pixels.shape == (16, 64, 3) and loaded.original_size == (50, 200) and "processed at 64x16" in loaded.note


def test_app_startup_error_is_one_line(world, capsys, monkeypatch):
    """The app's own StartupError path (weights that do not exist) through app.py's main."""
    code = run_app(["--weights", str(world / "w" / "absent.safetensors"), "--cache-dir", str(world / "appcache")],
                   monkeypatch)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "absent.safetensors" in err and "Traceback" not in err


def test_accepted_outputs_are_right(world, capsys):
    """Accepted odd inputs give the same index as clean ones where the pixels are the same."""
    assert build_index.main([a.replace("{w}", str(world)) for a in B(out="{w}/a")]) == 0
    capsys.readouterr()
    save_array(img(world), np.asarray(Image.open(img(world)).convert("RGBA")))  # same pixels, alpha 255
    assert build_index.main([a.replace("{w}", str(world)) for a in B(out="{w}/b")]) == 0
    a, b = SupportIndex.load(world / "a"), SupportIndex.load(world / "b")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert json.loads((world / "b" / "meta.json").read_text())["image_ids"] == a.meta["image_ids"]


def test_weights_of_random_bytes_are_always_a_clear_refusal(tmp_path, capsys):
    """Whatever torch's unpickler trips on (UnpicklingError, IndexError, KeyError, ...), --weights
    gets the same one clear error naming the file."""
    from cribo.backbones import BackboneLoadError, load_backbone

    path = tmp_path / "w.pth"
    rng = random.Random(7)
    for _ in range(300):
        path.write_bytes(rng.randbytes(rng.randrange(1, 512)))
        with pytest.raises(BackboneLoadError, match=r"w\.pth"):
            load_backbone(ARCH, str(path))
    assert capsys.readouterr().err == ""


def test_upload_smaller_than_a_patch_is_named_without_splits():
    """The app's one-image path: the message speaks of the image, not of a dataset split."""
    from cribo.backbones import load_backbone
    from index.features import image_features

    backbone = load_backbone(ARCH, random_init=True)
    with pytest.raises(ValueError, match=r"image of 8x40 \(HxW\) is smaller than one 16x16 patch: use a larger image") as e:
        image_features(backbone, np.zeros((8, 40, 3), np.uint8))
    assert "split" not in str(e.value)
