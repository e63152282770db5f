# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What a script plugs into the shared training: its trained model, how it turns a picture into frozen-model
outputs, its loss and its validation."""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Stage:
    name: str  # "prior" or "decoder"
    subfolder: str  # the trained model's folder in a pipeline and in a checkpoint: "prior" or "unet"
    model: torch.nn.Module  # the trained model, unwrapped
    model_cls: type
    make_sample: Callable  # (RGB image, dataset row, version, training shape or None) -> dict of tensors for `encode`
    encode: Callable  # batch of samples -> dict of frozen-model outputs (no grad)
    loss: Callable  # (wrapped model, outputs of encode, generator) -> scalar loss
    validate: Callable  # (model with the weights to show) -> list of (prompt, PIL image)
    frozen_models: tuple  # the encoders whose outputs `encode` returns: fingerprinted, freed after caching
    cache_key: dict = field(default_factory=dict)  # what, beside data and frozen weights, the cache depends on
    variants: Optional[Callable] = None  # dataset -> versions of each sample (captions, mirror); one drawn per epoch
    shapes: Optional[Callable] = None  # dataset -> training (width, height) of each sample (aspect-ratio buckets)
