# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Errors that need nothing loaded: the command line and the model folders are checked before any model, data set
or GPU time, and each problem is one line that names the flag to fix."""

import logging
import math
import os
from pathlib import Path

from .cli import DECODER_OPTIONS, LR_SCHEDULERS, installed, report_targets, tracker_names
from .checkpoint_folders import mixed_precision
from .errors import fail
from .output_dir import check_output_dir, local_inputs
from .images import IMAGE_EXTENSIONS

AT_LEAST_ONE = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_epochs",
                "num_train_epochs", "validation_inference_steps", "num_validation_images", "rank",
                "shuffle_buffer_size")
OPTIONAL_AT_LEAST_ONE = ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "validation_steps")


logger = logging.getLogger(__name__)
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


def check_args(args, stage):
    _check_image_options(args, stage)
    _check_data(args)
    _check_numbers(args)
    _check_optimization(args)
    _check_conflicts(args)
    _check_memory_levers(args)
    _check_packages(args)
    _check_precision(args)
    check_output_dir(args, stage)


def check_estimate_args(args, stage):
    """--estimate_memory: the checks of what the command asks of the model and the step; the data, packages and
    the device are the planned run's, not this machine's."""
    _check_image_options(args, stage)
    _check_numbers(args)
    _check_optimization(args)
    _check_conflicts(args)
    _check_memory_levers(args)
    if args.memory_budget_gib is not None and not args.memory_budget_gib > 0:
        fail(f"--memory_budget_gib must be a positive number of GiB, got {args.memory_budget_gib}.")


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
    _check_embedding_cache_dir(args)


def _check_embedding_cache_dir(args):
    """The cache's files must never land in a folder the run reads: a model folder (its files are the model's) or
    the data (they would become part of it)."""
    if getattr(args, "embedding_cache_dir", None) is None:
        return
    cache = os.path.realpath(args.embedding_cache_dir)
    for flag, path, folder in local_inputs(args):
        if os.path.commonpath([cache, folder]) == folder:
            fail(f"--embedding_cache_dir {args.embedding_cache_dir!r} is {'' if cache == folder else 'inside '}"
                 f"{flag} {path!r}: the cache would write its files into what the run reads. Choose a folder "
                 "outside it (the default is OUTPUT_DIR/embedding_cache).")


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
    if args.dataloader_num_workers < 0:
        fail(f"--dataloader_num_workers must be at least 0 (0 loads in the main process), got "
             f"{args.dataloader_num_workers}.")


def _check_optimization(args):
    """The optimizer's and the loss's numbers: what torch would refuse with a traceback at the first step, and what
    it would accept but train wrongly (a negative Min-SNR gamma turns the loss's sign)."""
    for name in ("learning_rate", "adam_epsilon", "adam_weight_decay", "max_grad_norm", "ema_decay"):
        if not math.isfinite(getattr(args, name)):
            fail(f"--{name} must be a finite number, got {getattr(args, name)}.")
    for name in ("learning_rate", "adam_epsilon", "adam_weight_decay"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be at least 0, got {getattr(args, name)}.")
        if getattr(args, name) > FLOAT32_MAX:  # torch's step would fail to turn it into float32, with a traceback
            fail(f"--{name} {getattr(args, name):g} is beyond float32's range ({FLOAT32_MAX:.4g}), which training "
                 "computes in.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:  # also refuses nan
            fail(f"--{name} must be in [0, 1), got {getattr(args, name)}.")
    if not 0.0 <= args.ema_decay <= 1.0:
        fail(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        fail(f"--snr_gamma must be a positive number (5.0 is recommended), got {args.snr_gamma}: the Min-SNR "
             "weight min(SNR, gamma) / SNR would be zero or negative, which trains nothing or in reverse.")
    if args.learning_rate == 0:
        logger.warning("--learning_rate 0: the weights will not change (Prodigy excepted, which takes it as a "
                       "factor and then also trains nothing).")


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


def _check_memory_levers(args):
    """--fused_backward_pass and --full_bf16 step one weight tensor at a time (memory.py)."""
    levers = [f"--{name}" for name in ("fused_backward_pass", "full_bf16") if getattr(args, name)]
    if levers and args.optimizer == "prodigy":
        fail(f"Conflicting flags: {levers[0]} steps each weight tensor on its own, and Prodigy estimates its step size "
             "from all of them together; use --optimizer adamw, adamw4bit or adafactor, or drop one of them.")
    precision = mixed_precision(args)
    if args.full_bf16 and precision != "bf16":
        fail(f"--full_bf16 needs --mixed_precision bf16 (this run's is {precision}): the bf16 weights need bf16 "
             "autocast around them.")
    if args.full_bf16 and args.use_lora:
        fail("Conflicting flags: --full_bf16 with --use_lora is not supported; the adapter is small, drop "
             "--full_bf16.")
    if args.fused_backward_pass and precision == "fp16":
        fail("Conflicting flags: --fused_backward_pass with --mixed_precision fp16 is not supported: fp16's loss "
             "scaling must see every gradient before any weight is stepped; use --mixed_precision bf16.")
    if args.fused_backward_pass and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("--fused_backward_pass runs on one process only: it steps each weight inside the backward pass, before "
             "the processes average their gradients, so they would drift apart. Drop it or train on one process.",
             every_rank=True)


def _check_packages(args):
    if args.report_to not in (*tracker_names(), "all", "none", ""):
        fail(f"Unknown --report_to {args.report_to!r}; choose one of {', '.join(tracker_names())}, all or none.")
    trackers = report_targets(args.report_to)
    for tracker in trackers:
        if args.report_to != "all" and not installed(tracker):
            fail(f"--report_to {tracker} needs the `{tracker}` package: pip install {tracker}")
    if args.use_8bit_adam and not installed("bitsandbytes"):
        fail("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.optimizer == "adamw4bit" and not installed("torchao"):
        fail("--optimizer adamw4bit needs the `torchao` package: pip install torchao")
    if args.optimizer == "prodigy" and not installed("prodigyopt"):
        fail("--optimizer prodigy needs the `prodigyopt` package: pip install prodigyopt")
    if getattr(args, "enable_xformers_memory_efficient_attention", False) and not installed("xformers"):
        fail("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
             "(PyTorch's own scaled-dot-product attention is used by default and is as fast on recent GPUs).")
    if args.use_lora and not installed("peft"):
        fail("--use_lora needs peft: pip install peft")


def _check_precision(args):
    """fp16 autocast needs a GPU: on the CPU the first step fails with a dtype mismatch (bf16 works there)."""
    import torch

    precision = mixed_precision(args)
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") or not (
        torch.cuda.is_available() or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    if precision == "fp16" and on_cpu:
        fail("--mixed_precision fp16 needs a GPU and this run is on the CPU: use --mixed_precision bf16 or no "
             "(or `accelerate config`'s mixed precision, which sets it when the flag is not given).")


def check_model_repo(path, subfolders, flag):
    """A local model folder must have the components the script loads; say which are missing."""
    if os.path.isdir(path):
        missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
        if missing:
            fail(f"{flag} {path!r} has no {', '.join(missing)} subfolder(s); expected a Kandinsky 2.2 model folder "
                 f"with {', '.join(subfolders)}.")
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        fail(f"{flag} {path!r} is neither a model folder nor a Hub model id.")
