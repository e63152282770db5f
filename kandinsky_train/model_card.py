# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""OUTPUT_DIR/README.md: the model card of the fine-tuned stage, through huggingface_hub's ModelCard."""

import os

from .images import image_grid

TAGS = ["kandinsky", "text-to-image", "diffusers", "diffusers-training"]


def write_model_card(args, stage_title, base_model, inference_snippet, images, extra_yaml=None, wandb_url=None):
    from huggingface_hub import ModelCard, ModelCardData

    if images:
        image_grid([image for _, image in images]).save(os.path.join(args.output_dir, "val_imgs_grid.png"))
    data = ModelCardData(
        license="apache-2.0",  # the license of Kandinsky 2.2
        base_model=None if os.path.isdir(base_model) else base_model,  # the Hub only accepts model ids here
        datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else None,
        tags=TAGS,
        library_name="diffusers",
        **(extra_yaml or {}),
    )
    settings = {
        "Epochs / steps": f"{args.num_train_epochs} / {args.max_train_steps}",
        "Learning rate": args.learning_rate,
        "LR schedule": f"{args.lr_scheduler} (warm-up {args.lr_warmup_steps} steps)",
        "Batch size": args.train_batch_size,
        "Gradient accumulation steps": args.gradient_accumulation_steps,
        "Resolution": args.resolution,
        "Mixed precision": args.mixed_precision,
        "Min-SNR gamma": args.snr_gamma,
        "EMA": args.use_ema,
        "LoRA": f"rank {args.rank}, alpha {args.lora_alpha}" if args.use_lora else "no",
    }
    lines = [f"# {stage_title} fine-tuned from {base_model}", "",
             f"Fine-tuned on {args.dataset_name or 'a local image folder'} with the Kandinsky 2.2 training scripts.",
             ""]
    if args.validation_prompts:
        lines += [f"Validation prompts: {', '.join(args.validation_prompts)}", ""]
    if images:
        lines += ["![validation images](./val_imgs_grid.png)", ""]
    lines += ["## Use", "", "```python", inference_snippet.strip(), "```", "", "## Training settings", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    if wandb_url:
        lines += ["", f"Training run: [Weights & Biases]({wandb_url})"]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(os.path.join(args.output_dir, "README.md"))
    return card
