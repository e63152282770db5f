# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""OUTPUT_DIR/README.md: the model card of the fine-tuned stage, through huggingface_hub's ModelCard. Its figures
are the run's own (steps and epochs run, samples seen, loss, time, hardware), and it names models by Hub id only:
a local path leaks the machine's layout and loads nowhere else."""

import os

from .flag_changes import earlier
from .images import image_grid

TAGS = ["kandinsky", "text-to-image", "diffusers", "diffusers-training"]


def is_our_card(path):
    """Whether the file at `path` is a model card an earlier run wrote (its metadata holds our tags), which a new
    final save may replace; anything else there (unreadable, no metadata, other tags) is the user's."""
    import yaml
    from huggingface_hub import metadata_load

    try:
        tags = (metadata_load(path) or {}).get("tags")
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, or not YAML: not a card we wrote
        return False
    return isinstance(tags, list) and set(TAGS) <= set(map(str, tags))


def hub_id(path):
    """The Hub id a model was given as, or None for a local folder."""
    return None if os.path.isdir(path) else path


def public_name(path):
    """How a card names a model: its Hub id, or for a local folder its name alone."""
    return hub_id(path) or f"a local model folder `{os.path.basename(os.path.normpath(path))}`"


def snippet_name(path):
    """A model in the card's code: its Hub id, or a placeholder for a local folder."""
    return hub_id(path) or f"path/to/{os.path.basename(os.path.normpath(path))}"


def output_name(args, repo_id):
    """How the card's code loads this run's output: the Hub repository it goes to, else a placeholder for the folder
    (its absolute path would leak the machine's layout when the folder is uploaded later, and load nowhere else)."""
    return repo_id or args.hub_model_id or snippet_name(args.output_dir)


def pair_snippet(prior, decoder, prompt, prior_lora=None, decoder_lora=None, decoder_scheduler=None,
                 decoder_class="KandinskyV22Pipeline", decoder_inputs=((), ())):
    """Code that generates with a prior and a decoder (Hub ids or folders; a LoRA adapter on either): two
    pipelines, the prior's image embeddings handed to the decoder. Loading them together through
    AutoPipelineForText2Image with `prior_*` components prints a warning with the whole model in it.
    decoder_scheduler: where the decoder's scheduler is saved (`scheduler/` beside an adapter trained with another
    --prediction_type than the stock decoder's), to replace the stock one. decoder_class, decoder_inputs: the
    pipeline of the inpainting or ControlNet decoder, and (lines that prepare its inputs, its call's arguments
    beside the embeddings)."""
    setup, arguments = decoder_inputs
    imports = ("DDPMScheduler, " if decoder_scheduler else "") + decoder_class
    setup_imports = [line for line in setup if line.startswith(("import ", "from "))]  # at the top, as usual
    setup = [line for line in setup if line not in setup_imports]  # blank lines kept: they set off a function
    lines = [*sorted(["import torch", *(line for line in setup_imports if line.startswith("import "))]),
             f"from diffusers import {imports}, KandinskyV22PriorPipeline",
             *(line for line in setup_imports if line.startswith("from ")), "",
             f'prior = KandinskyV22PriorPipeline.from_pretrained("{prior}", dtype=torch.float16).to("cuda")',
             f'decoder = {decoder_class}.from_pretrained("{decoder}", dtype=torch.float16).to("cuda")']
    for model, adapter in (("prior.prior", prior_lora), ("decoder.unet", decoder_lora)):
        if adapter:
            lines.append(f'{model}.load_lora_adapter("{adapter}", prefix=None, '
                         'weight_name="pytorch_lora_weights.safetensors")')
    if decoder_scheduler:  # the objective the adapter was trained with (v-prediction)
        lines.append(f'decoder.scheduler = DDPMScheduler.from_pretrained("{decoder_scheduler}", subfolder="scheduler")')
    return "\n".join(lines + list(setup) + [
        f'embeds = prior("{prompt}")',
        "image = decoder(image_embeds=embeds.image_embeds,",
        *[f"                {argument}," for argument in arguments],
        "                negative_image_embeds=embeds.negative_image_embeds).images[0]"])


def write_model_card(args, stage_title, base_model, inference_snippet, images, summary, extra_yaml=None,
                     notes=(), wandb_url=None):
    """summary: the run's own figures (tracking.RunSummary); notes: lines of text the stage adds."""
    from huggingface_hub import ModelCard, ModelCardData

    if images:
        image_grid([image for _, image in images]).save(os.path.join(args.output_dir, "val_imgs_grid.png"))
    data = ModelCardData(
        license="apache-2.0",  # the license of Kandinsky 2.2
        base_model=hub_id(base_model),  # the Hub only accepts model ids here
        datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else None,
        library_name="diffusers",
        **{"tags": TAGS, **(extra_yaml or {})},  # a stage may name more tags
    )
    dataset = hub_id(args.dataset_name) if args.dataset_name else None
    lines = [f"# {stage_title} fine-tuned from {public_name(base_model)}", "",
             f"Fine-tuned on {dataset or 'a local data set'} with the Kandinsky 2.2 training scripts.", ""]
    if not (args.push_to_hub or args.hub_model_id):
        notes = [*notes, f"The code below loads this folder from `{output_name(args, None)}`: give it where the "
                         "folder is (a local path, or the Hub repository it is uploaded to)."]
    lines += [*notes, ""] if notes else []
    if args.validation_prompts:
        lines += [f"Validation prompts: {', '.join(args.validation_prompts)}", ""]
    if images:
        lines += ["![validation images](./val_imgs_grid.png)", ""]
    lines += ["## Use", "", "```python", inference_snippet.strip(), "```", "", "## Training", "",
              "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**run_figures(summary), **settings(args, summary)}.items()]
    if wandb_url:
        lines += ["", f"Training run: [Weights & Biases]({wandb_url})"]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(os.path.join(args.output_dir, "README.md"))
    return card


def run_figures(summary):
    """What the run did."""
    since = (f" (since step {summary.counted_from_step}: the checkpoint it resumed from did not record them)"
             if summary.counted_from_step else "")
    loss = ("no step in the last session" if summary.final_loss is None
            else f"{summary.final_loss:.4g} (mean of the last {summary.loss_steps} steps)")
    epochs = ("1 or less (no pass reached the end of the stream)" if summary.epochs is None
              else f"{summary.epochs:.3g}")
    return {
        "Optimizer steps": summary.steps,
        "Epochs": epochs,
        "Samples seen": f"{summary.samples:,}{since}",
        "Final training loss": loss,
        "Training time": f"{duration(summary.seconds)}{since}",
        "Hardware": f"{summary.processes} x {summary.device}",
        "Precision": {"no": "fp32"}.get(summary.precision, summary.precision),
    }


def settings(args, summary):
    """How it was asked to train."""
    total = args.train_batch_size * summary.processes * args.gradient_accumulation_steps
    return {
        "Learning rate": f"{args.learning_rate}{earlier(summary.changes, '--learning_rate')}",
        # diffusers' "constant" schedule has no warm-up, whatever --lr_warmup_steps says
        "LR schedule": args.lr_scheduler if args.lr_scheduler == "constant" else
        f"{args.lr_scheduler} (warm-up {args.lr_warmup_steps} steps)",
        "Batch size": f"{total} ({args.train_batch_size} per device x {summary.processes} process(es) x "
                      f"{args.gradient_accumulation_steps} accumulation)",
        "Resolution": args.resolution,
        "Min-SNR gamma": args.snr_gamma if args.snr_gamma is not None else "off",
        "EMA": f"decay {args.ema_decay}{earlier(summary.changes, '--ema_decay')}" if args.use_ema else "off",
        "LoRA": f"rank {args.rank}, alpha {args.lora_alpha}" if args.use_lora else "off",
        **({"Full bf16": f"{'on' if args.full_bf16 else 'off'}{earlier(summary.changes, '--full_bf16')}"}
           if args.full_bf16 or earlier(summary.changes, "--full_bf16") else {}),
    }


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"
