"""CrIBo pretraining (ICLR 2024): the method on top of the :mod:`cribo` library.

Modules: ``transforms`` (two views + patch coordinates), ``clustering`` (joint-space clustering),
``bank`` (object memory banks), ``heads``, ``losses``, ``schedules``, ``config`` (``TrainConfig`` and
the training ``RECIPES``), ``step`` (one optimisation step, ``teacher_objects``), ``loop`` (the run:
sampling, logging, checkpoints, export), ``checkpoint``, ``timing``, ``data``, ``report``.

Usage::

    from cribo.pretrain import TrainConfig, train, export_teacher
    config = TrainConfig(data="path/to/images", output_dir="runs/a", arch="vit_tiny_patch16_224", max_steps=100)
    train(config)                      # resumes from runs/a/checkpoint.pth when present
    export_teacher("runs/a")           # -> runs/a/backbone.safetensors (+ .json), loadable by cribo.load_backbone
"""
from cribo.pretrain.config import TrainConfig
from cribo.pretrain.loop import export_teacher, train
from cribo.pretrain.step import CrIBoTrainer, teacher_objects

__all__ = ["TrainConfig", "train", "export_teacher", "CrIBoTrainer", "teacher_objects"]
