# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Errors that need nothing loaded: the command line and the model folders are checked before any model, data set
or GPU time, and each problem is one line that names the flag to fix."""

import os
from pathlib import Path

from .checkpoint_folders import CHECKPOINT_RE, Layout, is_reference, named_checkpoint, scan, step_of
from .cli import DECODER_OPTIONS, LR_SCHEDULERS, installed, report_targets
from .errors import fail
from .images import IMAGE_EXTENSIONS

AT_LEAST_ONE = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_epochs",
                "num_train_epochs", "validation_inference_steps", "num_validation_images", "rank",
                "shuffle_buffer_size")
OPTIONAL_AT_LEAST_ONE = ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "validation_steps")


def check_args(args, stage):
    _check_image_options(args, stage)
    _check_data(args)
    _check_numbers(args)
    _check_conflicts(args)
    _check_packages(args)
    _check_output_dir(args, stage)


def _check_image_options(args, stage):
    """The decoder's image options: refused by name by the prior, checked for range by the decoder (the bucket
    sides against the model's size multiple once its configuration is read: buckets.Buckets.from_args)."""
    if stage == "prior":
        given = [flag for flag in DECODER_OPTIONS if hasattr(args, flag[2:])]
        if given:
            fail(f"{given[0]} is a decoder option: the prior learns the CLIP image embedding of CLIP's own 224 px "
                 "centre crop of each picture, not its pixels or latents, so it has no use for it. Use it with "
                 "train_text_to_image_decoder.py.")
        return
    for name in ("noise_offset", "input_perturbation"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be at least 0, got {getattr(args, name)}.")
    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if getattr(args, name) is not None:
            if not args.enable_bucket:
                fail(f"--{name} needs --enable_bucket.")
            if getattr(args, name) < 1:
                fail(f"--{name} must be at least 1, got {getattr(args, name)}.")


def _check_data(args):
    if args.dataset_name is None and args.train_data_dir is None:
        fail("Need training data: give --dataset_name (a Hub dataset or a local dataset folder) or --train_data_dir "
             "(an image folder with metadata.jsonl).")
    if args.dataset_name is not None and args.train_data_dir is not None:
        fail("Conflicting flags: give either --dataset_name or --train_data_dir, not both.")
    if args.train_data_dir is not None:
        _check_image_folder("--train_data_dir", args.train_data_dir)
    _check_held_out(args)
    _check_streaming(args)


def _check_streaming(args):
    if not args.streaming:
        return
    if args.max_train_steps is None:
        fail("--streaming needs --max_train_steps: a stream has no length to count the training steps from.")
    why = {"cache_embeddings": "the cache is built by a pass over the whole data set before training, which a stream "
                               "is there to avoid; drop one of them.",
           "enable_bucket": "the buckets are planned from the size of every image before training; drop one of them.",
           "validation_split": "a stream has no rows to split; hold out a separate set with --validation_data_dir "
                               "or --validation_dataset_name."}
    for name, reason in why.items():
        if getattr(args, name, None):
            fail(f"Conflicting flags: --{name} with --streaming is not supported: {reason}")


def _check_image_folder(flag, folder):
    if not os.path.isdir(folder):
        fail(f"{flag} {folder!r} is not a folder.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(folder).rglob("*")):
        fail(f"{flag} {folder!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")


def _check_held_out(args):
    given = [f"--{name}" for name in ("validation_split", "validation_data_dir", "validation_dataset_name")
             if getattr(args, name) is not None]
    if len(given) > 1:
        fail(f"Conflicting flags: give one held-out set, not {' and '.join(given)}.")
    if args.validation_split is not None and not 0.0 < args.validation_split < 1.0:
        fail(f"--validation_split is the share of the data set held out, in (0, 1), got {args.validation_split}.")
    if args.validation_data_dir is not None:
        _check_image_folder("--validation_data_dir", args.validation_data_dir)
        if args.train_data_dir is not None and os.path.samefile(args.validation_data_dir, args.train_data_dir):
            fail("--validation_data_dir is the training folder: its loss would not measure anything held out. "
                 "Use --validation_split to hold out a share of it.")


def _check_numbers(args):
    if args.resolution <= 0 or args.resolution % 8:
        fail(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    for name in AT_LEAST_ONE:
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in OPTIONAL_AT_LEAST_ONE:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.lr_scheduler not in LR_SCHEDULERS:
        fail(f"Unknown --lr_scheduler {args.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}.")
    if not 0.0 <= args.conditioning_dropout_prob < 1.0:
        fail(f"--conditioning_dropout_prob must be in [0, 1), got {args.conditioning_dropout_prob}.")


def _check_conflicts(args):
    if args.use_lora and args.use_ema:
        fail("Conflicting flags: --use_ema with --use_lora is not supported; the adapter is small, drop --use_ema.")
    if (args.offload_ema or args.foreach_ema) and not args.use_ema:
        fail("--offload_ema and --foreach_ema need --use_ema.")
    if args.use_8bit_adam and args.optimizer != "adamw":
        fail(f"Conflicting flags: --use_8bit_adam is an AdamW; drop it or --optimizer {args.optimizer}.")
    if args.hub_push_checkpoints and not args.push_to_hub:
        fail("--hub_push_checkpoints needs --push_to_hub.")
    if "wandb" in report_targets(args.report_to) and args.hub_token is not None:
        fail("--report_to wandb with --hub_token would expose your token in the W&B run config; log in with "
             "`hf auth login` and drop --hub_token.")


def _check_packages(args):
    trackers = report_targets(args.report_to)
    for tracker in ("wandb", "tensorboard", "comet_ml"):
        if tracker in trackers and args.report_to != "all" and not installed(tracker):
            fail(f"--report_to {tracker} needs the `{tracker}` package: pip install {tracker}")
    if args.use_8bit_adam and not installed("bitsandbytes"):
        fail("--use_8bit_adam needs bitsandbytes (CUDA only): pip install bitsandbytes")
    if args.optimizer == "prodigy" and not installed("prodigyopt"):
        fail("--optimizer prodigy needs the `prodigyopt` package: pip install prodigyopt")
    if getattr(args, "enable_xformers_memory_efficient_attention", False) and not installed("xformers"):
        fail("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
             "(PyTorch's own scaled-dot-product attention is used by default and is as fast on recent GPUs).")
    if args.use_lora and not installed("peft"):
        fail("--use_lora needs peft: pip install peft")


def _check_output_dir(args, stage):
    layout = Layout.of(args, stage)
    complete, incomplete = scan(args.output_dir, layout)
    if args.resume_from_checkpoint is None:
        earlier = [os.path.basename(path) for _, path in complete]
        if earlier:  # a new run would overwrite them step by step, and rotation would delete its own first
            fail(f"--output_dir {args.output_dir!r} already holds checkpoints of an earlier run "
                 f"({', '.join(earlier[-3:])}). Add --resume_from_checkpoint latest to continue it, or choose "
                 "another --output_dir to start a new run.")
    start = complete[-1][0] if args.resume_from_checkpoint == "latest" and complete else 0
    if args.resume_from_checkpoint not in (None, "latest"):
        name = os.path.basename(os.path.normpath(args.resume_from_checkpoint))
        if not CHECKPOINT_RE.match(name):
            fail(f'--resume_from_checkpoint takes "latest" or a folder named checkpoint-<step>, got '
                 f"{args.resume_from_checkpoint!r}.")
        start = step_of(named_checkpoint(args, layout))
    for step, path, missing in incomplete:
        if step > start:  # this run would save its own checkpoint of that step over it
            name, lacks = os.path.basename(path), ", ".join(missing)
            if not is_reference(path):  # training_state.json is written last: the save was complete once
                newest = os.path.basename(complete[-1][1]) if complete else None
                fail(f"--output_dir {args.output_dir!r} holds {name}, which was saved complete but now lacks {lacks} "
                     f"(a partial copy or sync?), so it cannot be resumed (the newest complete checkpoint is "
                     f"{newest or 'none'}), and this run would save its own checkpoint of that step there. Restore "
                     f"the missing files, or move {name} out of --output_dir to "
                     f"{f'go on from {newest}' if newest else 'start over'}, then run again.")
            fail(f"--output_dir {args.output_dir!r} holds {name}, which is not a complete checkpoint (it lacks "
                 f"{lacks}; perhaps the half-written save of a run that was killed), and this run would save its own "
                 "checkpoint of that step there. Move it out of --output_dir (or delete it), then run again.")


def check_model_repo(path, subfolders, flag):
    """A local model folder must have the components the script loads; say which are missing."""
    if os.path.isdir(path):
        missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
        if missing:
            fail(f"{flag} {path!r} has no {', '.join(missing)} subfolder(s); expected a Kandinsky 2.2 model folder "
                 f"with {', '.join(subfolders)}.")
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        fail(f"{flag} {path!r} is neither a model folder nor a Hub model id.")
