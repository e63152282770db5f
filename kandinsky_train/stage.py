# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What a script plugs into the shared training: its trained model, how it turns a picture into frozen-model
outputs, its loss, its validation and what its held-out evaluation needs; and the CLIP image embedding, computed
alike by both stages."""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import errors, runtime


@dataclass
class FrozenPart:
    """Frozen-model outputs that are cached together (cache.py): the same name and key in another stage's cache
    mean the same values."""

    name: str  # what the log calls them
    encode: Callable  # batch of samples -> dict of outputs (no grad)
    models: tuple  # the frozen models it runs: fingerprinted, freed after caching
    key: dict = field(default_factory=dict)  # what, beside data and frozen weights, the outputs depend on
    per_version: bool = True  # whether a sample's versions differ in these outputs (False: cached once per sample)
    # The data set's picture columns beside the image (masks, hints) that these outputs depend on: their files key
    # the cache entry as the pictures' do.
    picture_columns: tuple = ()


@dataclass
class HeldOutHooks:
    """What the held-out evaluation (evaluation.py) needs of a stage."""

    predict: Callable  # (model, outputs of encode on the device, noise, timesteps) -> (prediction, target)
    noised: str  # the output of encode that the stage noises: the evaluation draws noise of its shape
    num_train_timesteps: int
    # prior only: (model, outputs of encode, one CPU generator per sample) -> cosine per sample between the image
    # embedding a short denoising predicts from the caption and the true one
    cosine: Callable = None


@dataclass
class Stage:
    name: str  # "prior" or "decoder"
    subfolder: str  # the trained model's folder in a pipeline and in a checkpoint: "prior" or "unet"
    model: torch.nn.Module  # the trained model, unwrapped
    model_cls: type
    make_sample: Callable  # (RGB image, dataset row, version, training shape or None) -> dict of tensors
    encode: Callable  # batch of samples -> dict of the stage's own frozen-model outputs (no grad)
    loss: Callable  # (wrapped model, outputs of encode, generator) -> scalar loss
    validate: Callable  # (model with the weights to show) -> list of (prompt, PIL image)
    frozen_models: tuple  # the encoders whose outputs `encode` returns: fingerprinted, freed after caching
    cache_key: dict = field(default_factory=dict)  # what, beside data and frozen weights, the cache depends on
    # The CLIP image embedding (the prior's target, the decoder's condition), encoded and cached apart from
    # `encode`'s outputs, so that the second stage trained on the same data reuses the first one's.
    image_embedding: FrozenPart = None
    columns: tuple = ()  # the data set's columns make_sample reads beside the image
    picture_columns: tuple = ()  # those of them that hold pictures (masks, hints), whose files key the cache
    held_out: HeldOutHooks = None
    variants: Optional[Callable] = None  # dataset -> versions of each sample (captions, mirror); one drawn per epoch
    shapes: Optional[Callable] = None  # dataset -> training (width, height) of each sample (aspect-ratio buckets)
    # Whether the loss draws something per sample (the inpainting decoder's masks) from features["sample_seed"],
    # one seed per sample of (seed, epoch, sample) (diffusion.sample_seeds): given only then, so that other stages'
    # steps neither compute it nor copy it to the device.
    draws_per_sample: bool = False
    decoder_type: str = None  # the decoder's type (decoders.DECODER_TYPES), recorded in its checkpoints


def clip_pixels(image_processor, image):
    """A picture as the CLIP image encoder sees it (the sample's `clip_pixel_values`)."""
    return image_processor(image, return_tensors="pt").pixel_values[0]


def load_clip_image_tower(args, accelerator, what):
    """The CLIP image processor and the frozen CLIP image tower of the prior's folder (both stages use them), the
    tower in the frozen models' dtype; `what` names the model a failed load is reported as."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path, load = args.pretrained_prior_model_name_or_path, dict(cache_dir=args.cache_dir)
    with errors.loading(what, "--pretrained_prior_model_name_or_path", path):
        image_processor = CLIPImageProcessor.from_pretrained(path, subfolder="image_processor", **load)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            path, subfolder="image_encoder", torch_dtype=runtime.weight_dtype_of(accelerator), **load)
    return image_processor, runtime.freeze(image_encoder, args, accelerator)


def zero_image_embedding(image_encoder, image_processor, device, dtype):
    """CLIP's image embedding of an all-zero image, (1, dim) on `device`: the unconditional embedding of the
    pipelines' classifier-free guidance (and of the decoder's dropped conditions). The encoder comes to the device
    for it alone (runtime.on_device)."""
    crop = image_processor.crop_size
    with torch.no_grad(), runtime.on_device(device, image_encoder):
        return image_encoder(torch.zeros(1, 3, crop["height"], crop["width"], device=device,
                                         dtype=dtype)).image_embeds


def without_image_encoder(prior_pipe, zero_embed):
    """A KandinskyV22PriorPipeline whose negative image embeddings are `zero_embed` (what its get_zero_embed
    computes with the CLIP image tower), so that the tower, the largest model of all, need not be on the device
    while it runs."""
    prior_pipe.get_zero_embed = lambda batch_size=1, device=None: zero_embed.to(device).repeat(batch_size, 1)
    return prior_pipe


def clip_image_embedding(image_encoder, image_processor, device, dtype, mirrored=False):
    """The CLIP image embedding of a batch's `clip_pixel_values`: one definition for both stages, so that the cache
    entry one writes is the other's. `mirrored`: a sample's second version is the picture's mirror (--random_flip);
    else every version (the prior's captions) shows the same picture, and the entry holds one embedding a sample.
    Entries of different meaning are never shared."""

    def encode(batch):
        return {"image_embeds": image_encoder(batch["clip_pixel_values"].to(device, dtype)).image_embeds}

    versions = "the picture, its mirror" if mirrored else "the picture"
    # The class too: transformers' torchvision and PIL processors share one configuration but not their pixels
    # (resizing differs in the last bits), and which one `CLIPImageProcessor` is depends on what is installed.
    processor = type(image_processor)
    return FrozenPart("CLIP image embeddings", encode, (image_encoder,),
                      {"image_processor": image_processor.to_dict(), "versions": versions,
                       "image_processor_class": f"{processor.__module__}.{processor.__qualname__}"},
                      per_version=mirrored)
