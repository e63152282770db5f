#!/usr/bin/env python
# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune the Kandinsky 2.2 prior: a PriorTransformer that predicts the CLIP image embedding of a picture from
its caption. The CLIP text and image encoders stay frozen. Same command line as diffusers'
examples/kandinsky2_2/text_to_image/train_text_to_image_prior.py, plus the flags listed in README.md."""

import argparse
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from kandinsky_train import (checks, cli, data, diffusion, errors, estimate, holdout, hub, loop, preemption, runtime,
                             storage, streaming, validation)
from kandinsky_train.checkpoint_folders import Layout
from kandinsky_train.evaluation import fixed_noise
from kandinsky_train.model_card import output_name, pair_snippet, snippet_name
from kandinsky_train.stage import (HeldOutHooks, Stage, clip_image_embedding, clip_pixels, load_clip_image_tower,
                                   without_image_encoder, zero_image_embedding)

STAGE = "prior"
PRIOR_SUBFOLDERS = ["prior", "text_encoder", "image_encoder", "tokenizer", "image_processor", "scheduler"]
DECODER_SUBFOLDERS = ["unet", "movq", "scheduler"]
EVAL_DENOISING_STEPS = 10  # eval_cosine: a short, fixed denoising from the caption to the image embedding


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Fine-tune the Kandinsky 2.2 prior.")
    cli.add_common_arguments(parser, STAGE)
    parser.add_argument("--caption_column", type=str, default="text",
                        help="The dataset column that holds the captions.")
    args = parser.parse_args(input_args)
    return cli.finish_args(args)


def enable_prior_gradient_checkpointing(prior):
    """PriorTransformer has no built-in gradient checkpointing: recompute each transformer block in backward."""
    for block in prior.transformer_blocks:
        def checkpointed(*inputs, _forward=block.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *inputs, use_reentrant=False, **kwargs)
            return _forward(*inputs, **kwargs)

        block.forward = checkpointed


def main(args):
    if args.estimate_memory:  # the models from their configurations, on fake tensors: no weight, no data
        check_model_folders(args)
        return estimate.main(args, STAGE, lambda accelerator: PriorStage(
            args, accelerator, load_models(args, accelerator)).stage())
    checks.check_args(args, STAGE)
    check_model_folders(args)
    accelerator = runtime.make_accelerator(args)
    hub_repo_id = hub.create_repo(args, accelerator)
    if hub.upload_missing(args, accelerator, hub_repo_id):  # a finished run whose upload was cut short
        return
    dataset, report = streaming.training_data(args, accelerator, caption_column=args.caption_column)
    dataset, held_out = holdout.held_out_data(args, accelerator, dataset, caption_column=args.caption_column)
    models = load_models(args, accelerator)
    prior = PriorStage(args, accelerator, models)
    trained = loop.train(args, accelerator, prior.stage(), dataset, report, hub_repo_id, held_out)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        preemption.finishing("the final save")
        save_final(args, accelerator, trained, models, hub_repo_id)
    accelerator.end_training()


def check_model_folders(args):
    checks.check_model_repo(args.pretrained_prior_model_name_or_path, PRIOR_SUBFOLDERS,
                            "--pretrained_prior_model_name_or_path")
    if args.validation_prompts:
        checks.check_model_repo(args.pretrained_decoder_model_name_or_path, DECODER_SUBFOLDERS,
                                "--pretrained_decoder_model_name_or_path")


@dataclass
class PriorModels:
    """What the prior stage runs: the trained prior, the frozen CLIP encoders (on the device; with
    --cache_embeddings waiting on the CPU, runtime.frozen_device), the schedulers, and the decoder that renders
    validation images (main process only; it waits on the CPU)."""

    prior: torch.nn.Module
    tokenizer: object
    image_processor: object
    text_encoder: torch.nn.Module
    image_encoder: torch.nn.Module
    inference_scheduler: object  # UnCLIPScheduler: validation, eval_cosine and the saved pipeline
    noise_scheduler: object  # DDPMScheduler: training
    decoder_pipe: object


def load_models(args, accelerator):
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, PriorTransformer, UnCLIPScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    prior_path, decoder_path = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    weight_dtype, load = runtime.weight_dtype_of(accelerator), dict(cache_dir=args.cache_dir)
    with errors.loading("prior model", "--pretrained_prior_model_name_or_path", prior_path):
        tokenizer = CLIPTokenizer.from_pretrained(prior_path, subfolder="tokenizer", **load)
        text_encoder = runtime.freeze(CLIPTextModelWithProjection.from_pretrained(
            prior_path, subfolder="text_encoder", torch_dtype=weight_dtype, **load), args, accelerator)
        prior = PriorTransformer.from_pretrained(prior_path, subfolder="prior", **load)
        inference_scheduler = UnCLIPScheduler.from_pretrained(prior_path, subfolder="scheduler", **load)
    image_processor, image_encoder = load_clip_image_tower(args, accelerator, "prior model")
    decoder_pipe = None
    if args.validation_prompts and accelerator.is_main_process:  # only the main process renders
        with errors.loading("decoder (used to render validation images)", "--pretrained_decoder_model_name_or_path",
                            decoder_path):
            decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_path, torch_dtype=weight_dtype, **load)
        decoder_pipe.set_progress_bar_config(disable=True)
    # clip_mean / clip_std are the image-embedding statistics, not weights to learn: frozen, which also keeps
    # DistributedDataParallel from waiting for gradients they never get.
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    if not args.estimate_memory and not torch.all(prior.clip_std != 0):  # fake tensors hold no values
        errors.fail(f"The prior in {prior_path!r} has zeros in clip_std (an untrained PriorTransformer?); training "
                    "divides the image embeddings by it. Start from a trained Kandinsky 2.2 prior.")
    if args.use_lora:
        runtime.add_lora(args, prior, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    if args.gradient_checkpointing:
        enable_prior_gradient_checkpointing(prior)
    prior.train()
    return PriorModels(prior, tokenizer, image_processor, text_encoder, image_encoder,
                       inference_scheduler, DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
                       decoder_pipe)


class PriorStage:
    """The prior's part of training: a sample is a caption's tokens and CLIP's view of the picture; the frozen text
    encoder's outputs condition the prior, which learns to denoise the picture's (normalised) CLIP image embedding;
    held out, the loss and the cosine of a short denoising; validation renders through the base decoder."""

    def __init__(self, args, accelerator, models):
        from diffusers import UnCLIPScheduler

        self.args, self.accelerator, self.m = args, accelerator, models
        self.device, self.dtype = accelerator.device, runtime.weight_dtype_of(accelerator)  # the frozen models'
        self.clip_mean = models.prior.clip_mean.detach().to(self.device)
        self.clip_std = models.prior.clip_std.detach().to(self.device)
        # The unconditional input that classifier-free guidance uses at inference: the empty caption.
        with torch.no_grad(), runtime.on_device(self.device, models.text_encoder):
            self.uncond = self.encode(self.tokens([""]))
        self.eval_scheduler = UnCLIPScheduler.from_config(models.inference_scheduler.config)  # set_timesteps: own
        self.zero_image = None  # the validation pipeline's negative image embedding (CLIP of a zero image)
        if args.validation_prompts and accelerator.is_main_process:  # only the main process renders
            with torch.no_grad(), accelerator.autocast():  # as the pipeline would compute it
                self.zero_image = zero_image_embedding(models.image_encoder, models.image_processor, self.device,
                                                       self.dtype)

    def stage(self):
        from diffusers import PriorTransformer

        args, m = self.args, self.m
        return Stage(
            name=STAGE, subfolder="prior", model=m.prior, model_cls=PriorTransformer, encode=self.encode,
            loss=self.loss, validate=self.validate, make_sample=self.make_sample, frozen_models=(m.text_encoder,),
            cache_key={"caption_column": args.caption_column, "tokenizer_len": len(m.tokenizer)},
            image_embedding=clip_image_embedding(m.image_encoder, m.image_processor, self.device, self.dtype),
            columns=(args.caption_column,),
            variants=lambda dataset: data.caption_counts(dataset, args.caption_column),
            held_out=HeldOutHooks(predict=self.predict, noised="image_embeds", cosine=self.eval_cosine,
                                  num_train_timesteps=m.noise_scheduler.config.num_train_timesteps))

    def tokens(self, captions):
        tokenizer = self.m.tokenizer
        tokens = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                           return_tensors="pt")
        return {"text_input_ids": tokens.input_ids, "text_mask": tokens.attention_mask.bool()}

    def make_sample(self, image, row, variant, shape):  # the variant-th caption of a list; no shape: CLIP crops
        tokens = self.tokens([data.caption_text(row[self.args.caption_column], variant)])
        return {"clip_pixel_values": clip_pixels(self.m.image_processor, image),
                **{key: value[0] for key, value in tokens.items()}}

    def encode(self, batch):  # the image embedding, the target, is `image_embedding`'s (shared with the decoder's)
        text = self.m.text_encoder(batch["text_input_ids"].to(self.device))
        return {"prompt_embeds": text.text_embeds, "text_hidden_states": text.last_hidden_state,
                "text_mask": batch["text_mask"].to(self.device)}

    def loss(self, model, features, generator):
        device, scheduler = self.device, self.m.noise_scheduler
        features = {k: v.to(device, non_blocking=True) for k, v in features.items()}
        image_embeds = features["image_embeds"]
        bsz = image_embeds.shape[0]
        if self.args.conditioning_dropout_prob > 0:
            drop = torch.rand(bsz, device=device, generator=generator) < self.args.conditioning_dropout_prob
            for key, value in self.uncond.items():
                features[key] = torch.where(drop.view(-1, *[1] * (value.ndim - 1)), value.expand_as(features[key]),
                                            features[key])
        noise = torch.randn(image_embeds.shape, device=device, generator=generator, dtype=image_embeds.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device,
                                  generator=generator)
        pred, target = self.predict(model, features, noise, timesteps)
        return diffusion.diffusion_loss(pred, target, scheduler, timesteps, self.args.snr_gamma)

    @staticmethod
    def denoise(model, sample, timesteps, features):
        """The prior's image embedding (normalised) from a noised one and the caption's text features."""
        return model(sample, timestep=timesteps, proj_embedding=features["prompt_embeds"],
                     encoder_hidden_states=features["text_hidden_states"],
                     attention_mask=features["text_mask"]).predicted_image_embedding

    def predict(self, model, features, noise, timesteps):
        """The prior's prediction from noised image embeddings, and its target (training and held-out loss)."""
        target = (features["image_embeds"] - self.clip_mean) / self.clip_std  # the prior works on normalised ones
        noisy = self.m.noise_scheduler.add_noise(target, noise, timesteps)
        return self.denoise(model, noisy, timesteps, features), target

    def eval_cosine(self, model, features, generators):
        """What the prior is for, without rendering: the caption's image embedding after a short denoising from
        fixed noise (each sample's generator, no guidance), against the true one."""
        scheduler = self.eval_scheduler
        scheduler.set_timesteps(EVAL_DENOISING_STEPS, device=self.device)
        timesteps = scheduler.timesteps
        true = features["image_embeds"]
        latents = scheduler.init_noise_sigma * fixed_noise(generators, true.shape[1:]).to(self.device, true.dtype)
        for i, t in enumerate(timesteps):
            following = timesteps[i + 1] if i + 1 < len(timesteps) else None
            latents = scheduler.step(self.denoise(model, latents, t, features), timestep=t, sample=latents,
                                     generator=generators, prev_timestep=following).prev_sample
        predicted = latents * self.clip_std + self.clip_mean
        return torch.nn.functional.cosine_similarity(predicted.float(), true.float(), dim=-1)

    def validate(self, model):
        """The validation prompts through the prior being trained, rendered by the base decoder."""
        from diffusers import KandinskyV22PriorPipeline

        args, m = self.args, self.m
        pipe = KandinskyV22PriorPipeline(prior=model, image_encoder=m.image_encoder, text_encoder=m.text_encoder,
                                         tokenizer=m.tokenizer, scheduler=m.inference_scheduler,
                                         image_processor=m.image_processor)
        pipe.set_progress_bar_config(disable=True)
        without_image_encoder(pipe, self.zero_image)
        generator = torch.Generator(device=self.device).manual_seed(args.seed or 0)
        prompts = [prompt for prompt in args.validation_prompts for _ in range(args.num_validation_images)]
        decoder = m.decoder_pipe
        # Beside the prior being trained, one frozen model at a time on the device: the text tower for every
        # prompt's embeddings, then the decoder to render them (the image tower not at all).
        with torch.no_grad(), self.accelerator.autocast():
            with runtime.on_device(self.device, m.text_encoder):
                embeds = [pipe(prompt, num_inference_steps=args.validation_inference_steps,
                               guidance_scale=args.validation_guidance_scale, generator=generator)
                          for prompt in prompts]
            with runtime.on_device(self.device, decoder.unet, decoder.movq):
                return [(prompt, validation.render(decoder, args, out.image_embeds, out.negative_image_embeds,
                                                   generator))
                        for prompt, out in zip(prompts, embeds)]


def save_final(args, accelerator, trained, models, hub_repo_id):
    """OUTPUT_DIR becomes a KandinskyV22PriorPipeline folder (or a LoRA adapter file with --use_lora)."""
    from diffusers import KandinskyV22PriorPipeline
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    prior_path = args.pretrained_prior_model_name_or_path
    output = output_name(args, hub_repo_id)

    def pipeline(prior):
        # The frozen encoders are saved as they were stored, not in the training's half precision.
        text_encoder = CLIPTextModelWithProjection.from_pretrained(prior_path, subfolder="text_encoder",
                                                                   cache_dir=args.cache_dir)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(prior_path, subfolder="image_encoder",
                                                                      cache_dir=args.cache_dir)
        return KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                         tokenizer=models.tokenizer, scheduler=models.inference_scheduler,
                                         image_processor=models.image_processor)

    storage.save_trained(trained, args.output_dir, Layout.of(args, STAGE), pipeline)
    pair = dict(decoder=snippet_name(args.pretrained_decoder_model_name_or_path),
                prompt=(args.validation_prompts or ["a photo"])[0])
    snippet = (pair_snippet(prior=snippet_name(prior_path), prior_lora=output, **pair) if args.use_lora
               else pair_snippet(prior=output, **pair))
    hub.publish(args, accelerator, STAGE, prior_path, snippet, trained.images, hub_repo_id, trained.summary)


if __name__ == "__main__":
    errors.main_guard(lambda: main(parse_args()))
