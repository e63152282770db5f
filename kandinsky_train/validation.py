# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Validation images: the stage renders its prompts with the weights to show (EMA when on), on the main process
only; the images go to the trackers and to OUTPUT_DIR/validation. And the cadence of the loop's validations: the
images and the held-out evaluation, when each is due, what a stop leaves owing, and the final ones."""

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


class Validations:
    """The training loop's validation images and held-out evaluation (`evaluation`, a HeldOutEvaluation, or None) of
    `model` (the prepared one) at the run's position (`state`, a TrainState): when due (every --validation_steps
    steps, or at the end of an epoch), owed by a stop, at the start of a run and at its end (`max_steps`)."""

    def __init__(self, args, accelerator, stage, model, ema, evaluation, state, max_steps):
        self.args, self.accelerator, self.stage, self.model, self.ema = args, accelerator, stage, model, ema
        self.evaluation, self.state, self.max_steps = evaluation, state, max_steps
        self.shown, self.evaluated_at = None, None  # the last validation (step, images), the last evaluation's step

    def at_start(self):
        """A new run's held-out curve starts at step 0, with the weights it starts from; a resumed run first does
        what a stop at its checkpoint's step left undone."""
        if self.state.global_step == 0:
            self.evaluate()
        due, self.state.validation_due = self.state.validation_due, []
        self.run("images" in due, "evaluate" in due)

    def when_due(self, end_of_epoch=None):
        self.run(*self.due(end_of_epoch))

    def due(self, end_of_epoch=None):
        """(validation images, held-out evaluation) due now; the last step's are at_finish()'s."""
        if self.state.global_step >= self.max_steps:
            return False, False
        return validations_due(self.args, self.state.global_step, end_of_epoch)

    def due_at_stop(self):
        """What a stop at this step leaves undone: the step's validation and, at the last step of an epoch, the
        epoch's (a stream's resumed run reaches the end of its pass itself)."""
        due = self.due()
        if self.state.steps_per_epoch and self.state.epoch_steps % self.state.steps_per_epoch == 0:
            due = [a or b for a, b in zip(due, self.due(end_of_epoch=self.state.epoch))]
        return [name for name, flag in zip(("images", "evaluate"), due) if flag]

    def at_finish(self):
        """The final validation images (those of this step if shown already: a stream that ran out of passes has
        validated its last step) and the final evaluation, unless done at this step."""
        step = self.state.global_step
        images = self.shown[1] if self.shown and self.shown[0] == step else self.validate()
        if self.evaluated_at != step:
            self.evaluate()
        return images

    def run(self, images, evaluate):
        if images:
            self.validate()
        if evaluate:
            self.evaluate()

    def validate(self):
        step, model = self.state.global_step, self.accelerator.unwrap_model(self.model)
        self.shown = step, run_validation(self.args, self.accelerator, self.stage, model, self.ema, step)
        return self.shown[1]

    def evaluate(self):
        if self.evaluation is not None:
            self.evaluation.run(self.accelerator.unwrap_model(self.model), self.ema, self.state.global_step)
            self.evaluated_at = self.state.global_step


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
