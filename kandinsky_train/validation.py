# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Validation images: the stage renders its prompts with the weights to show (EMA when on), on the main process
only; the images go to the trackers and to OUTPUT_DIR/validation."""

import os

from . import storage
from .ema import ema_weights
from .tracking import log_images


def run_validation(args, accelerator, stage, model, ema, step):
    """Render, log and save the validation images of this step; [] without prompts or off the main process."""
    if not args.validation_prompts or not accelerator.is_main_process:
        return []
    with ema_weights(ema, model) as shown:
        images = stage.validate(shown)
    log_images(accelerator, images, step)
    save_images(args.output_dir, images, step)
    return images


def validations_due(args, step, end_of_epoch=None):
    """(validation images, held-out evaluation) due at optimizer step `step`, or at the end of epoch `end_of_epoch`:
    every --validation_steps steps; without it, at the end of an epoch, the images every --validation_epochs epochs
    and the evaluation every epoch."""
    if args.validation_steps:
        due = end_of_epoch is None and step % args.validation_steps == 0
        return due, due
    return end_of_epoch is not None and end_of_epoch % args.validation_epochs == 0, end_of_epoch is not None


def save_images(output_dir, images, step):
    folder = os.path.join(output_dir, "validation")
    needed = sum(image.width * image.height * 3 for _, image in images)  # uncompressed: PNG takes less
    os.makedirs(folder, exist_ok=True)
    for i, (prompt, image) in enumerate(images):
        path = os.path.join(folder, f"step-{step:06d}-{i:02d}.png")
        with storage.writing("the validation images", folder, needed, partial=path, basis="uncompressed",
                             advice="Free some space and continue with --resume_from_checkpoint latest."):
            image.save(path)


def render(decoder_pipe, args, image_embeds, negative_image_embeds, generator, size=None, **inputs):
    """One validation image from image embeddings, at the validation step count and at (width, height) `size`,
    by default the training resolution; `inputs`: the inpainting or ControlNet decoder's (image and mask, hint)."""
    width, height = size or (args.resolution, args.resolution)
    return decoder_pipe(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds,
                        height=height, width=width,
                        num_inference_steps=args.validation_inference_steps,
                        guidance_scale=args.validation_guidance_scale, generator=generator, **inputs).images[0]
