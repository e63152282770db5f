#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune the Kandinsky 2.2 decoder: a UNet that denoises MoVQ latents conditioned on the CLIP image embedding.
The MoVQ and the CLIP image encoder stay frozen. Same command line as diffusers'
examples/kandinsky2_2/text_to_image/train_text_to_image_decoder.py, plus the flags listed in README.md."""

import argparse
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from kandinsky_train import (buckets, checks, cli, decoders, diffusion, errors, estimate, holdout, hub, images, loop,
                             preemption, runtime, storage, streaming, validation)
from kandinsky_train.checkpoint_folders import Layout
from kandinsky_train.model_card import TAGS, hub_id, output_name, pair_snippet, snippet_name
from kandinsky_train.stage import (HeldOutHooks, Stage, clip_image_embedding, clip_pixels, load_clip_image_tower,
                                   without_image_encoder, zero_image_embedding)

STAGE = "decoder"
DECODER_SUBFOLDERS = ["unet", "movq", "scheduler"]
PRIOR_SUBFOLDERS_NEEDED = ["image_encoder", "image_processor"]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Fine-tune the Kandinsky 2.2 decoder (UNet).")
    cli.add_common_arguments(parser, STAGE)
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                        help="Use xformers' memory-efficient attention in the UNet.")
    # The inpainting and depth-ControlNet decoders (diffusers' names for their columns and validation inputs)
    parser.add_argument("--decoder_type", type=str, default="auto", choices=["auto", *decoders.DECODER_TYPES],
                        help="Which Kandinsky 2.2 decoder --pretrained_decoder_model_name_or_path is. Default: read "
                        "from its UNet's configuration (9 input channels: inpainting; an image_hint embedding: "
                        "ControlNet); naming one makes a different model an error.")
    parser.add_argument("--mask_column", type=str, default=None,
                        help="Inpainting: the column of masks, white where the picture is repainted, cropped, "
                        "resized and mirrored with the picture. Without it, masks are drawn for each sample and "
                        "epoch from --seed (see --random_mask_full_prob, --random_mask_stroke_prob).")
    parser.add_argument("--random_mask_full_prob", type=float, default=0.25,
                        help="Inpainting without --mask_column: the share of drawn masks that repaint the whole "
                        "picture (Stable Diffusion's inpainting models trained with 25%%), so the model still "
                        "generates from nothing.")
    parser.add_argument("--random_mask_stroke_prob", type=float, default=0.35,
                        help="Inpainting without --mask_column: the share of drawn masks made of thick random "
                        "strokes (LaMa-style); the rest are a random rectangle or ellipse.")
    parser.add_argument("--conditioning_image_column", type=str, default=None,  # None: not given (refused elsewhere)
                        help="ControlNet: the column of hint pictures (depth maps), of the picture's size, cropped, "
                        "resized and mirrored with it. Default: conditioning_image.")
    parser.add_argument("--validation_image", type=str, default=None, nargs="+",
                        help="Inpainting and ControlNet: the picture to repaint (inpainting) or the hint "
                        "(ControlNet) of each --validation_prompts entry, or one for all of them.")
    parser.add_argument("--validation_mask_image", type=str, default=None, nargs="+",
                        help="Inpainting: the mask (white = repaint) of each --validation_image, or one for all.")
    args = parser.parse_args(input_args)
    return cli.finish_args(args)


def main(args):
    if args.estimate_memory:  # the models from their configurations, on fake tensors: no weight, no data
        decoder, shapes = check_models_and_shapes(args)
        return estimate.main(args, STAGE, lambda accelerator: DecoderStage(
            args, accelerator, load_models(args, accelerator), shapes, decoder).stage())
    checks.check_args(args, STAGE)
    decoder, shapes = check_models_and_shapes(args)
    accelerator = runtime.make_accelerator(args)
    hub_repo_id = hub.create_repo(args, accelerator)
    if hub.upload_missing(args, accelerator, hub_repo_id):  # a finished run whose upload was cut short
        return
    dataset, report = streaming.training_data(args, accelerator)
    dataset, held_out = holdout.held_out_data(args, accelerator, dataset)
    dataset, held_out = decoder.check_data(dataset, held_out)  # the inpainting masks' or ControlNet hints' column
    models = load_models(args, accelerator)
    stage = DecoderStage(args, accelerator, models, shapes, decoder)
    trained = loop.train(args, accelerator, stage.stage(), dataset, report, hub_repo_id, held_out)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        preemption.finishing("the final save")
        save_final(args, accelerator, trained, models.noise_scheduler, hub_repo_id, decoder)
    accelerator.end_training()


@dataclass
class Shapes:
    """The decoder's training and rendering shapes, checked against the models' configurations before any weight
    loads: the aspect-ratio buckets (or None) and the extra --validation_resolutions."""

    bucketing: object
    extra_sizes: list


def check_models_and_shapes(args):
    """(the decoder, decoders.TextToImage or a subclass; Shapes), from the models' configurations."""
    from diffusers import UNet2DConditionModel, VQModel

    extra_sizes = buckets.parse_shapes(args.validation_resolutions, "--validation_resolutions") \
        if args.validation_resolutions else []
    prior_path, decoder_path = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    checks.check_model_repo(decoder_path, DECODER_SUBFOLDERS, "--pretrained_decoder_model_name_or_path")
    needed = PRIOR_SUBFOLDERS_NEEDED + (["prior", "text_encoder", "tokenizer", "scheduler"]
                                        if args.validation_prompts else [])
    checks.check_model_repo(prior_path, needed, "--pretrained_prior_model_name_or_path")
    with errors.loading("MoVQ and UNet configurations", "--pretrained_decoder_model_name_or_path", decoder_path):
        movq_config = VQModel.load_config(decoder_path, subfolder="movq", cache_dir=args.cache_dir)
        unet_config = UNet2DConditionModel.load_config(decoder_path, subfolder="unet", cache_dir=args.cache_dir)
    decoder = decoders.resolve(args, unet_config, decoder_path)
    decoders.check_resumed_type(args, decoder, decoder_path)
    multiple = buckets.size_multiple(movq_config, unet_config)
    buckets.check_resolution(args.resolution, multiple)
    render_multiple = buckets.render_multiple(movq_config)
    for width, height in extra_sizes:
        if width % render_multiple or height % render_multiple:
            errors.fail(f"--validation_resolutions {width}x{height}: the pipeline renders sides in multiples of "
                        f"{render_multiple} (MoVQ's factor squared); choose such sides.")
    return decoder, Shapes(buckets.Buckets.from_args(args, multiple) if args.enable_bucket else None, extra_sizes)


@dataclass
class DecoderModels:
    """What the decoder stage runs: the trained UNet, the frozen MoVQ and CLIP image encoder on the device, the
    noise scheduler (with --prediction_type), and the validation prompts' image embeddings (main process only)."""

    unet: torch.nn.Module
    movq: torch.nn.Module
    noise_scheduler: object
    image_processor: object
    image_encoder: torch.nn.Module
    validation_embeds: list  # (prompt, image_embeds, negative_image_embeds)


def load_models(args, accelerator):
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    decoder_path, weight_dtype = args.pretrained_decoder_model_name_or_path, runtime.weight_dtype_of(accelerator)
    load = dict(cache_dir=args.cache_dir)
    with errors.loading("decoder model", "--pretrained_decoder_model_name_or_path", decoder_path):
        noise_scheduler = DDPMScheduler.from_pretrained(decoder_path, subfolder="scheduler", **load)
        movq = VQModel.from_pretrained(decoder_path, subfolder="movq", torch_dtype=weight_dtype, **load)
        unet = UNet2DConditionModel.from_pretrained(decoder_path, subfolder="unet", **load)
    if args.prediction_type is not None:  # trains with it, validates with it, and is saved with the pipeline
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    image_processor, image_encoder = load_clip_image_tower(args, accelerator, "CLIP image encoder")
    runtime.freeze(movq, args, accelerator)
    validation_embeds = prompt_embeddings(args, accelerator, image_encoder, image_processor)
    if args.use_lora:
        runtime.add_lora(args, unet, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"])
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if accelerator.device.type == "cuda":
        unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
    unet.train()
    return DecoderModels(unet, movq, noise_scheduler, image_processor, image_encoder, validation_embeds)


def prompt_embeddings(args, accelerator, image_encoder, image_processor):
    """The validation prompts' image embeddings from the base prior, on the main process (the only one that
    renders): the prior is frozen here, so they are computed once and the prior freed."""
    from diffusers import KandinskyV22PriorPipeline

    if not (args.validation_prompts and accelerator.is_main_process):
        return []
    prior_path, device = args.pretrained_prior_model_name_or_path, accelerator.device
    with errors.loading("prior (used for validation prompts)", "--pretrained_prior_model_name_or_path", prior_path):
        prior_pipe = KandinskyV22PriorPipeline.from_pretrained(
            prior_path, image_encoder=image_encoder, image_processor=image_processor,
            torch_dtype=runtime.weight_dtype_of(accelerator), cache_dir=args.cache_dir)
    prior_pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(args.seed or 0)
    embeds = []
    with torch.no_grad(), accelerator.autocast():
        # the image tower's one use here, the negative embedding, computed alone: the tower waits on the CPU with
        # --cache_embeddings, and is the largest model
        without_image_encoder(prior_pipe, zero_image_embedding(image_encoder, image_processor, device,
                                                               runtime.weight_dtype_of(accelerator)))
        with runtime.on_device(device, prior_pipe.prior, prior_pipe.text_encoder):
            for prompt in args.validation_prompts:
                for _ in range(args.num_validation_images):
                    out = prior_pipe(prompt, num_inference_steps=args.validation_inference_steps,
                                     guidance_scale=args.validation_guidance_scale, generator=generator)
                    embeds.append((prompt, out.image_embeds, out.negative_image_embeds))
    return embeds


class DecoderStage:
    """The decoder's part of training: a sample is the picture's pixels at its training shape and CLIP's view of it;
    MoVQ's latents are what the UNet learns to denoise, conditioned on the CLIP image embedding (the zero image's for
    dropped conditions); validation renders the prompts' embeddings at --resolution and --validation_resolutions."""

    def __init__(self, args, accelerator, models, shapes, decoder):
        self.args, self.accelerator, self.m, self.shapes, self.decoder = args, accelerator, models, shapes, decoder
        self.device, self.dtype = accelerator.device, runtime.weight_dtype_of(accelerator)  # the frozen models'
        self.resample = images.RESAMPLING[args.image_interpolation_mode]
        # The unconditional embedding the pipelines use for classifier-free guidance: CLIP of an all-zero image.
        self.zero_embed = zero_image_embedding(models.image_encoder, models.image_processor, self.device, self.dtype)

    def stage(self):
        from diffusers import UNet2DConditionModel

        args, m, bucketing, decoder = self.args, self.m, self.shapes.bucketing, self.decoder
        objective = dict(noise_scheduler=m.noise_scheduler, decoder=decoder)
        return Stage(
            name=STAGE, subfolder="unet", model=m.unet, model_cls=UNet2DConditionModel, encode=self.encode,
            loss=functools.partial(compute_loss, args=args, zero_embed=self.zero_embed, **objective),
            validate=self.validate, make_sample=self.make_sample, frozen_models=(m.movq,), columns=decoder.columns,
            picture_columns=decoder.columns,
            cache_key={"resolution": args.resolution, "interpolation": args.image_interpolation_mode,
                       "random_flip": args.random_flip, "buckets": bucketing.shapes if bucketing else None,
                       **decoder.cache_key},
            image_embedding=clip_image_embedding(m.image_encoder, m.image_processor, self.device, self.dtype,
                                                 mirrored=args.random_flip),
            variants=(lambda dataset: [2] * len(dataset)) if args.random_flip else None,
            draws_per_sample=decoder.draws_per_sample, decoder_type=decoder.name,
            shapes=(lambda dataset: bucketing.assign(self.accelerator, dataset, args.image_column))
            if bucketing else None,
            held_out=HeldOutHooks(predict=functools.partial(predict, **objective), noised="latents",
                                  num_train_timesteps=m.noise_scheduler.config.num_train_timesteps))

    def make_sample(self, image, row, variant, shape):  # version 1: mirrored (--random_flip); shape: the bucket's
        size = shape or self.args.resolution
        sample = decoder_sample(image, size, self.resample, self.m.image_processor)
        sample.update(self.decoder.sample_inputs(image, row, size, self.resample))
        return {key: value.flip(-1) for key, value in sample.items()} if variant == 1 else sample

    def encode(self, batch):  # the condition, the CLIP image embedding, is `image_embedding`'s (shared with the prior)
        latents = self.m.movq.encode(batch["pixel_values"].to(self.device, self.dtype)).latents
        return {"latents": latents, **self.decoder.encode_inputs(batch, latents)}

    def validate(self, model):
        """The validation prompts' embeddings rendered by the UNet being trained, at each validation size."""
        import diffusers

        args, m = self.args, self.m
        sizes = [(args.resolution, args.resolution)] + self.shapes.extra_sizes
        pipeline_class = getattr(diffusers, self.decoder.pipeline_class)
        pipe = pipeline_class(unet=model, scheduler=m.noise_scheduler, movq=m.movq)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device=self.device).manual_seed(args.seed or 0)
        with torch.no_grad(), self.accelerator.autocast(), runtime.on_device(self.device, m.movq):
            return [(prompt if i == 0 else f"{prompt} ({width}x{height})",
                     validation.render(pipe, args, embeds, negative, generator, (width, height),
                                       **self.validation_inputs(number // args.num_validation_images,
                                                                (width, height))))
                    for number, (prompt, embeds, negative) in enumerate(m.validation_embeds)
                    for i, (width, height) in enumerate(sizes)]

    def validation_inputs(self, number, size):
        """The decoder's inputs of a validation prompt, its tensors on the device: the pipeline moves a ControlNet
        hint there only when it guides (--validation_guidance_scale above 1)."""
        inputs = self.decoder.validation_inputs(number, size)
        return {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in inputs.items()}


def decoder_sample(image, size, resample, image_processor, flip=False):
    """What the decoder trains on for one picture: its pixels centre-cropped and resized to `size` (a side, or
    (width, height)), in [-1, 1], and CLIP's view of it; both mirrored left to right with `flip`, after the crop,
    where diffusers' Stable Diffusion script flips (make_sample mirrors the decoder's other inputs with them)."""
    pixels = np.asarray(images.center_crop_resize(image, size, resample), dtype=np.float32) / 127.5 - 1.0
    sample = {"pixel_values": torch.from_numpy(pixels).permute(2, 0, 1),
              "clip_pixel_values": clip_pixels(image_processor, image)}
    return {key: value.flip(-1) for key, value in sample.items()} if flip else sample


def compute_loss(model, features, generator, *, args, noise_scheduler, decoder, zero_embed):
    """The decoder's diffusion loss on a batch of MoVQ latents and CLIP image embeddings. It draws from `generator`
    in this order: conditioning dropout, noise, timesteps, then --noise_offset's shift and --input_perturbation's
    extra noise, so that a run without those options draws what it always drew."""
    device = zero_embed.device
    latents = features["latents"].to(device, non_blocking=True)
    image_embeds = features["image_embeds"].to(device, non_blocking=True)
    bsz, channels = latents.shape[:2]
    if args.conditioning_dropout_prob > 0:
        drop = torch.rand(bsz, device=device, generator=generator) < args.conditioning_dropout_prob
        image_embeds = torch.where(drop[:, None], zero_embed.expand_as(image_embeds), image_embeds)
    noise = torch.randn(latents.shape, device=device, generator=generator, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device,
                              generator=generator)
    if args.noise_offset:  # one shift per image and channel: lets the model learn overall brightness
        noise = noise + args.noise_offset * torch.randn((bsz, channels, 1, 1), device=device, generator=generator,
                                                        dtype=latents.dtype)
    model_noise = noise
    if args.input_perturbation:  # the input sees more noise than the target accounts for
        model_noise = noise + args.input_perturbation * torch.randn(latents.shape, device=device,
                                                                    generator=generator, dtype=latents.dtype)
    pred, target = predict(model, {**features, "latents": latents, "image_embeds": image_embeds}, noise, timesteps,
                           noise_scheduler=noise_scheduler, decoder=decoder, input_noise=model_noise)
    return diffusion.diffusion_loss(pred, target, noise_scheduler, timesteps, args.snr_gamma)


def predict(model, features, noise, timesteps, *, noise_scheduler, decoder, input_noise=None):
    """The UNet's prediction from noised latents, and its target (training and held-out loss). input_noise: what
    noises the input where it differs from the noise the target is made of (--input_perturbation). The decoder
    adds its own inputs (masked latents and mask, a hint) to the noised latents."""
    latents = features["latents"]
    noisy = noise_scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    if noisy.device.type == "cuda":
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    # The UNet also predicts the variance in its last 4 channels; only the first 4 are trained.
    sample, added = decoder.unet_inputs(noisy, features)
    pred = model(sample, timesteps, None, added_cond_kwargs={"image_embeds": features["image_embeds"], **added}).sample
    return pred[:, :4], target


def save_final(args, accelerator, trained, scheduler, hub_repo_id, decoder):
    """OUTPUT_DIR becomes the decoder's pipeline folder (KandinskyV22Pipeline, KandinskyV22InpaintPipeline or
    KandinskyV22ControlnetPipeline; or a LoRA adapter file with --use_lora, and the scheduler it was trained with
    when --prediction_type is given). When the prior is a Hub model, the card names it, so that
    AutoPipelineForText2Image loads the pair from OUTPUT_DIR alone; a local prior folder is only described (a path
    would leak and load nowhere else)."""
    import diffusers
    from diffusers import VQModel

    decoder_path, prior_path = args.pretrained_decoder_model_name_or_path, args.pretrained_prior_model_name_or_path
    output = output_name(args, hub_repo_id)

    def pipeline(unet):
        movq = VQModel.from_pretrained(decoder_path, subfolder="movq", cache_dir=args.cache_dir)  # as stored
        return getattr(diffusers, decoder.pipeline_class)(unet=unet, scheduler=scheduler, movq=movq)

    storage.save_trained(trained, args.output_dir, Layout.of(args, STAGE), pipeline)
    # An adapter loads into the stock decoder, whose scheduler predicts what the base model was trained to: the
    # one trained with, saved beside the adapter, is what sampling it needs.
    own_scheduler = args.use_lora and args.prediction_type is not None
    if own_scheduler:
        scheduler.save_pretrained(os.path.join(args.output_dir, "scheduler"))
    pair = dict(prior=snippet_name(prior_path), prompt=(args.validation_prompts or ["a photo"])[0],
                decoder_class=decoder.pipeline_class, decoder_inputs=decoder.snippet_inputs())
    snippet = (pair_snippet(decoder=snippet_name(decoder_path), decoder_lora=output, **pair,
                            decoder_scheduler=output if own_scheduler else None) if args.use_lora
               else pair_snippet(decoder=output, **pair))
    notes = [] if hub_id(prior_path) else [
        f"Generate with the Kandinsky 2.2 prior it was trained with, a local model folder "
        f"`{os.path.basename(os.path.normpath(prior_path))}` (or one fine-tuned from it): the code below expects it "
        f"at `{pair['prior']}`."]
    extra_yaml = {"prior": [prior_path]} if hub_id(prior_path) else {}
    if decoder.tags:
        extra_yaml["tags"] = [*TAGS, *decoder.tags]
    title = STAGE if decoder.name == "text2img" else decoder.description  # "inpainting decoder"...
    hub.publish(args, accelerator, title, decoder_path, snippet, trained.images, hub_repo_id, trained.summary,
                extra_yaml=extra_yaml or None, notes=notes)


if __name__ == "__main__":
    errors.main_guard(lambda: main(parse_args()))
