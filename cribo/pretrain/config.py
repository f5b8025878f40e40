"""Training configuration (`TrainConfig`) and the registry of training recipes (`RECIPES`, chosen with `--preset`).

Steps, not epochs. The reference (DINO/CrIBo) counts warm-ups, the frozen last layers and the start of
the cross-image loss in epochs. Here every length is in optimisation steps; a preset may give a
length in epochs (``*_epochs`` fields), which ``TrainConfig.resolved(epoch_steps)`` turns into steps
with ``epoch_steps = len(dataset) // global_batch`` (the number of full global batches per pass,
``global_batch = batch_size * world_size``). An explicit ``*_steps`` value wins over the epochs.

The run's identity (:meth:`TrainConfig.identity`) is a fingerprint of the resolved configuration minus
the fields that do not change the computation (where to stop, how often to log or checkpoint, how many
loader workers): a checkpoint remembers it, and resuming with another identity is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cribo.precision import DTYPES, PRECISIONS
from cribo.pretrain.clustering import CLUSTERING_MODES
from cribo.pretrain.losses import CI_NORMALISATIONS
from cribo.pretrain.transforms import AUGMENTATIONS

BANK_DTYPES = tuple(DTYPES)  # fp32, fp16, bf16

#: Fields that do not change what is computed: excluded from the run identity.
NON_IDENTITY_FIELDS = frozenset({"stop_at", "log_every", "ckpt_every", "num_workers", "output_dir",
                                 "device", "progress", "debug_bank_hash", "eval_every", "eval_data",
                                 "eval_dataset", "eval_train_split", "eval_val_split", "eval_support",
                                 "eval_queries"})

#: Fields added after runs existed: left out of the identity while at these defaults, so a run
#: started before the field existed resumes with the code that has it.
IDENTITY_OMITTED_DEFAULTS = {"student_augment": None, "rotate": 0.0, "teacher_targets": "teacher-views"}

#: Where the teacher's targets come from (``TrainConfig.teacher_targets``).
TEACHER_TARGETS = ("teacher-views", "student-views")

#: The fields that shape the networks and loss centres: ``--init-from`` needs them equal in both runs.
INIT_COMPATIBLE_FIELDS = ("arch", "img_size", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "norm_last_layer")

#: Epoch-denominated lengths and the step field each one resolves to.
EPOCH_FIELDS = {
    "warmup_epochs": "warmup_steps",
    "freeze_last_layer_epochs": "freeze_last_layer_steps",
    "teacher_temp_warmup_epochs": "teacher_temp_warmup_steps",
    "ci_start_epoch": "ci_start_step",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a CrIBo pretraining run (section 3, appendix A.1).

    Lengths: ``max_steps`` is the run's length (every schedule spans it). Each ``*_steps`` field may
    be ``None``, then it comes from the matching ``*_epochs`` field via :meth:`resolved`.
    """

    # --- data and run --------------------------------------------------------------------------
    data: str = ""                      # image folder, ImageNet/COCO/VOC root or "hf:NAME[:SPLIT]" (cribo.pretrain.data)
    data_split: str | None = None       # layout split (None: the layout's training split / whole folder)
    skip_corrupt: bool = False          # log and skip unreadable images instead of failing
    output_dir: str = ""                # OUT: checkpoint.pth, log.jsonl, backbone.safetensors
    max_steps: int = 0                  # run length N in optimisation steps
    batch_size: int = 0                 # images PER PROCESS; global batch = batch_size * world_size
    seed: int = 0                       # fixed default: two identical commands give identical runs
    # --- network ---------------------------------------------------------------------------------
    arch: str = "vit_small_patch16_224"  # timm ViT name (cribo.backbones.ARCHS); patch size follows it
    img_size: int = 224                 # side of both global views (multiple of the patch size)
    drop_path: float = 0.1              # student stochastic depth (teacher: 0)
    out_dim: int = 65536                # L prototypes of both last layers
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    norm_last_layer: bool = True
    # --- CrIBo -----------------------------------------------------------------------------------
    num_clusters: int = 32              # K
    lambda_pos: float = 1.0             # positional cost weight (Eq. 16)
    n_outer: int = 5                    # clustering outer iterations
    n_sinkhorn: int = 5                 # Sinkhorn iterations per outer iteration
    clustering: str = "paper"           # paper | reference (the authors' code, update_c): cribo.pretrain.clustering
    bank_images: int = 25000            # S: images held in each FIFO bank
    bank_dtype: str = "fp16"            # storage dtype of the banks
    use_cross_image: bool = True        # False: ablation without L_ci^o (Table 5 row 2)
    ci_normalisation: str = "paper"     # L_ci^o: paper (Z1, Z2) | reference (both by Z1): cribo.pretrain.losses
    crop_scale: tuple[float, float] = (0.25, 1.0)
    augment: str = "dino"               # view augmentations (cribo.pretrain.transforms.AUGMENTATIONS): dino | texture | mild | colour | grey | grey-all | recolour | recolour-pair
    # Asymmetric views: the student sees the teacher's crops with THESE photometric changes (an
    # AUGMENTATIONS name); the teacher (clustering, targets, bank) sees ``augment``'s. None: CrIBo's
    # one set of views for both.
    student_augment: str | None = None
    # With student_augment: which views the teacher's targets (global, objects, bank) come from.
    # "teacher-views": augment's, where it also clusters (the asymmetric views above). "student-views":
    # the teacher still clusters augment's views (their colours agree, so it finds the same objects in
    # both), but describes the student's views, pooled by those clusters (not in the paper).
    teacher_targets: str = "teacher-views"
    rotate: float = 0.0                 # views' crop windows turned by U(-rotate, rotate) degrees (0: CrIBo's)
    # --- optimisation (DINO) ---------------------------------------------------------------------
    lr: float = 5e-4                    # base lr, scaled by global_batch / 256
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996     # EMA momentum, cosine to 1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_epochs: float = 30.0
    teacher_temp_warmup_steps: int | None = None
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0
    freeze_last_layer_steps: int | None = None
    ci_start_epoch: float = 1.0         # L_ci^o is active from this epoch on ("from epoch 1")
    ci_start_step: int | None = None
    clip_grad: float = 3.0              # per-parameter-tensor norm clipping (DINO); 0 disables
    # auto | fp32 | bf16 (autocast, CPU or GPU) | fp16 (autocast + GradScaler, GPU). "auto" is resolved
    # when the run starts (cribo.precision): bf16 where the hardware has bf16 arithmetic (GPUs,
    # AVX-512-BF16/AMX CPUs), else fp32 (bf16 autocast is several times slower on AVX2-only CPUs).
    precision: str = "auto"
    # Start from the networks (student, teacher, heads) and loss centres of another run's checkpoint
    # (a train.py checkpoint.pth of the same architecture and heads), or from a backbone ("builtin" or
    # an exported .safetensors: heads and centres fresh); optimiser, schedules, memory
    # bank and step start afresh. Read only when the run starts at step 0; a resume ignores it.
    init_from: str | None = None
    # --- run management (not part of the identity) -----------------------------------------------
    stop_at: int | None = None          # checkpoint after this step and exit (planned interruption)
    log_every: int = 10
    ckpt_every: int = 500
    num_workers: int = 4
    device: str = "cpu"
    progress: bool = True               # tqdm bar on rank 0
    debug_bank_hash: bool = False       # write OUT/bank_rank{r}.json (bank fingerprint) at the end
    # --- learning curve (not part of the identity): cribo.pretrain.loop evaluates the teacher by k-NN retrieval
    # (index.probe.RetrievalProbe) on a fixed labelled subset every eval_every steps (0: never).
    eval_every: int = 0
    eval_data: str = ""                 # labelled dataset root (index.datasets kinds, see eval_dataset)
    eval_dataset: str = "folder"        # its layout: folder | voc | ade20k
    eval_train_split: str = "support"   # support images come from this split ...
    eval_val_split: str = "val"         # ... query images from this one
    eval_support: int = 64              # first N images of eval_train_split
    eval_queries: int = 60              # first N images of eval_val_split
    preset: str = field(default="", compare=False)  # name of the preset it came from (informative)

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("max_steps", "batch_size", "img_size", "out_dim", "num_clusters", "bank_images",
                     "n_outer", "n_sinkhorn", "log_every", "ckpt_every"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer (set --" + name.replace("_", "-") + ")")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if self.eval_every < 0 or (self.eval_every > 0 and not self.eval_data):
            raise bad("eval_every", "must be >= 0, and > 0 needs --eval-data (a labelled dataset root)")
        if self.eval_support < 1 or self.eval_queries < 2:
            raise bad("eval_support", f"need --eval-support >= 1 and --eval-queries >= 2 (got {self.eval_queries})")
        if not 0 <= self.seed < 2**31:
            raise bad("seed", "must be an integer in [0, 2**31) (set --seed)")
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0 (set --" + name.replace("_", "-") + ")")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {', '.join(PRECISIONS)}")
        if self.augment not in AUGMENTATIONS:
            raise bad("augment", f"choose one of {', '.join(AUGMENTATIONS)}")
        if self.student_augment is not None and self.student_augment not in AUGMENTATIONS:
            raise bad("student_augment", f"choose one of {', '.join(AUGMENTATIONS)}")
        if self.teacher_targets not in TEACHER_TARGETS:
            raise bad("teacher_targets", f"choose one of {', '.join(TEACHER_TARGETS)}")
        if self.teacher_targets == "student-views" and self.student_augment is None:
            raise bad("teacher_targets", "targets from the student's views need --student-augment NAME")
        if not 0.0 <= self.rotate <= 180.0:
            raise bad("rotate", "need an angle in degrees in [0, 180] (--rotate)")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise bad("crop_scale", "need 0 < MIN <= MAX <= 1 (fractions of the image area)")
        if self.bank_dtype not in BANK_DTYPES:
            raise bad("bank_dtype", f"choose one of {', '.join(BANK_DTYPES)}")
        if self.clustering not in CLUSTERING_MODES:
            raise bad("clustering", f"choose one of {', '.join(CLUSTERING_MODES)} (--clustering)")
        if self.ci_normalisation not in CI_NORMALISATIONS:
            raise bad("ci_normalisation", f"choose one of {', '.join(CI_NORMALISATIONS)} (--ci-normalisation)")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.max_steps:
            raise bad("stop_at", f"must be in [1, max_steps={self.max_steps}]")
        if not 0.0 <= self.drop_path < 1.0:
            raise bad("drop_path", "must be in [0, 1)")
        if self.lambda_pos < 0:
            raise bad("lambda_pos", "must be >= 0")
        if self.lr <= 0 or self.min_lr < 0:
            raise bad("lr", "lr must be > 0 and min_lr >= 0")
        if not 0.0 <= self.momentum_teacher <= 1.0:
            raise bad("momentum_teacher", "must be in [0, 1]")
        if self.clip_grad < 0:
            raise bad("clip_grad", "must be >= 0 (0 disables clipping)")
        for epochs, steps in EPOCH_FIELDS.items():
            if getattr(self, epochs) < 0:
                raise bad(epochs, "must be >= 0")
            if getattr(self, steps) is not None and getattr(self, steps) < 0:
                raise bad(steps, "must be >= 0")

    # ------------------------------------------------------------------------------------------------
    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, s) is not None for s in EPOCH_FIELDS.values())

    def resolved(self, epoch_steps: int) -> "TrainConfig":
        """A copy whose ``*_steps`` fields are all set: explicit steps, else ``round(epochs * epoch_steps)``.

        The warm-ups are capped at ``max_steps`` (a warm-up longer than the run is cut, as DINO's
        schedules would be); the frozen last layers and the cross-image start are not capped.
        """
        if epoch_steps <= 0:
            raise ValueError(f"epoch_steps={epoch_steps}: the dataset holds fewer images than one global batch")
        updates: dict[str, int] = {}
        for epochs, steps in EPOCH_FIELDS.items():
            value = getattr(self, steps)
            if value is None:
                value = int(round(getattr(self, epochs) * epoch_steps))
            updates[steps] = value
        updates["warmup_steps"] = min(updates["warmup_steps"], self.max_steps)
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples): JSON- and ``torch.load(weights_only=True)``-safe."""
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        d = dict(d)
        if "crop_scale" in d:
            d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)

    def identity(self, **extra: Any) -> str:
        """sha256 fingerprint of the resolved config minus :data:`NON_IDENTITY_FIELDS`, plus ``extra``
        (the engine adds the world size and the dataset length)."""
        if not self.is_resolved:
            raise ValueError("TrainConfig.identity: resolve the epoch-based lengths first (config.resolved(epoch_steps))")
        d = {k: v for k, v in self.to_dict().items() if k not in NON_IDENTITY_FIELDS and k != "preset"
             and not (k in IDENTITY_OMITTED_DEFAULTS and v == IDENTITY_OMITTED_DEFAULTS[k])}
        d.update(extra)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def identity_diff(self, other: dict[str, Any]) -> list[str]:
        """Names of the identity fields whose values differ from ``other`` (a stored ``to_dict()``; a
        field it lacks has its :data:`IDENTITY_OMITTED_DEFAULTS` value, if it has one)."""
        mine = self.to_dict()
        return sorted(k for k in set(mine) | set(other)
                      if k not in NON_IDENTITY_FIELDS and k != "preset"
                      and mine.get(k) != other.get(k, IDENTITY_OMITTED_DEFAULTS.get(k)))


# ---------------------------------------------------------------------------------------------------
# Training recipes (train.py --preset): the paper's released runs (appendix A.1, method reference) and a small CPU run.
# Lengths in epochs resolve against the dataset at hand; max_steps and batch_size come from the CLI.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    overrides: dict[str, Any]


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, **overrides: Any) -> Recipe:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown TrainConfig fields {unknown}")
    if name in RECIPES:
        raise ValueError(f"preset {name!r} is already registered")
    RECIPES[name] = Recipe(name, description, dict(overrides))
    return RECIPES[name]


# The three released runs, field by field from the authors' argument files
# (../shared/reference/released-args/*_args.json; tests/test_presets_released.py compares them and
# docs/fidelity.md lists what has no counterpart). Their clustering is the authors' (``update_c``
# true -> "reference") and so is their L_ci^o normalisation. Precision as released: fp16 + GradScaler
# for the ViT-S runs (CUDA only: pass --precision bf16 or fp32 elsewhere), fp32 for the ViT-B run.
_RELEASED_RECIPE = dict(img_size=224, drop_path=0.1, out_dim=65536, bank_images=25000, crop_scale=(0.25, 1.0),
                        n_outer=5, n_sinkhorn=5, clustering="reference", ci_normalisation="reference",
                        warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
                        warmup_teacher_temp=0.04, teacher_temp=0.07, student_temp=0.1, ci_start_epoch=1, seed=0)
register_recipe(
    "in1k-vits16",
    "ImageNet-1k ViT-S/16 as released: 800 epochs, 128 images per GPU, K=32, lambda_pos=1, S=25k, fp16.",
    arch="vit_small_patch16_224", num_clusters=32, lambda_pos=1.0, norm_last_layer=False,
    lr=5e-4, min_lr=1e-5, teacher_temp_warmup_epochs=30, freeze_last_layer_epochs=1, clip_grad=0.0,
    precision="fp16", **_RELEASED_RECIPE,
)
register_recipe(
    "in1k-vitb16",
    "ImageNet-1k ViT-B/16 as released: 400 epochs, 64 images per GPU, K=32, lambda_pos=1, lr 7.5e-4, clip 0.3, fp32.",
    arch="vit_base_patch16_224", num_clusters=32, lambda_pos=1.0, norm_last_layer=True,
    lr=7.5e-4, min_lr=2e-6, teacher_temp_warmup_epochs=50, freeze_last_layer_epochs=3, clip_grad=0.3,
    precision="fp32", **_RELEASED_RECIPE,
)
register_recipe(
    "coco-vits16",
    "COCO ViT-S/16 as released: 300 epochs, 32 images per GPU, K=64, lambda_pos=2, S=25k, fp16.",
    arch="vit_small_patch16_224", num_clusters=64, lambda_pos=2.0, norm_last_layer=False,
    lr=5e-4, min_lr=1e-5, teacher_temp_warmup_epochs=30, freeze_last_layer_epochs=1, clip_grad=0.0,
    precision="fp16", **_RELEASED_RECIPE,
)
register_recipe(
    "cpu-tiny",
    "A few-hour CPU run: ViT-Ti/16 at 128 px (64 patches per view), L=4096, K=16, S=2000 images.",
    arch="vit_tiny_patch16_224", img_size=128, drop_path=0.1, out_dim=4096,
    head_hidden_dim=1024, head_bottleneck_dim=256,
    num_clusters=16, lambda_pos=1.0, bank_images=2000, bank_dtype="fp16",
    lr=1e-3, min_lr=1e-5, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4,
    momentum_teacher=0.99, warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup_epochs=5,
    freeze_last_layer_epochs=1, ci_start_epoch=1, clip_grad=3.0,
)


def config_from_recipe(preset: str | None, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` defaults <- the preset's values <- ``overrides`` (``None`` values are ignored,
    so CLI flags left unset keep the preset's value; use explicit values to override)."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in RECIPES:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(RECIPES))}")
        values.update(RECIPES[preset].overrides)
        values["preset"] = preset
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
