"""CrIBo pretraining (ICLR 2024): the method, on top of the :mod:`cribo` library.

Modules: ``transforms`` (two views + patch coordinates), ``clustering`` (joint-space clustering),
``bank`` (object memory banks), ``heads``, ``losses``, ``schedules``, ``config`` (``TrainConfig`` and
the training ``RECIPES``), ``step`` (one optimisation step; ``teacher_objects``, shared with the app),
``loop`` (the run: sampling, logging, checkpoints, export; owns the ``timing``), ``checkpoint``,
``data``, ``report``.

Usage::

    from cribo.pretrain import TrainConfig, export_teacher, train
    config = TrainConfig(data="path/to/images", output_dir="runs/a", arch="vit_tiny_patch16_224", max_steps=100)
    train(config)                      # resumes from runs/a/checkpoint.pth when present
    export_teacher("runs/a")           # -> runs/a/backbone.safetensors (+ .json): cribo.load_backbone(weights=...)

The names below are re-exported lazily.
"""
from __future__ import annotations

from cribo.exports import lazy_exports

_EXPORTS = {
    "TrainConfig": "cribo.pretrain.config", "RECIPES": "cribo.pretrain.config",
    "config_from_recipe": "cribo.pretrain.config",
    "train": "cribo.pretrain.loop", "export_teacher": "cribo.pretrain.loop",
    "CrIBoTrainer": "cribo.pretrain.step", "teacher_objects": "cribo.pretrain.step",
    "TwoViewTransform": "cribo.pretrain.transforms", "joint_space_clustering": "cribo.pretrain.clustering",
    "ObjectMemoryBank": "cribo.pretrain.bank",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("cribo.pretrain", _EXPORTS)
