# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What the prior and the decoder training scripts share.

Each script keeps its own models, loss, validation and final save; this module holds the rest once:
the command line both accept, early checks of that command line and of the data, the image loader,
the frozen-output cache, checkpoints (atomic save, rotation, resume), preemption, logging, the
Accelerate training loop and the Hub upload.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger("kandinsky_train")

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
HUB_IGNORE = ["checkpoint-*", ".tmp-checkpoint-*", "logs", "logs/**", "embedding_cache", "embedding_cache/**"]


class UserError(Exception):
    """A problem with the command line or the data that the user can fix; printed without a traceback."""


def fail(message):
    raise UserError(message)


def first_line(error):
    """The first line of an exception's message (libraries often add pages of context below it)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def add_common_arguments(parser, stage):
    """The flags both scripts accept, with the names, types and defaults of diffusers' reference scripts."""
    model = "PriorTransformer" if stage == "prior" else "UNet"
    add = parser.add_argument
    add("--pretrained_decoder_model_name_or_path", type=str, default="kandinsky-community/kandinsky-2-2-decoder",
        help="Hub id or local folder of the Kandinsky 2.2 decoder (unet, movq, scheduler)."
        + (" Used to render validation images." if stage == "prior" else " The UNet in it is trained."))
    add("--pretrained_prior_model_name_or_path", type=str, default="kandinsky-community/kandinsky-2-2-prior",
        help="Hub id or local folder of the Kandinsky 2.2 prior (prior, text_encoder, image_encoder, tokenizer, "
        "image_processor, scheduler)."
        + (" The prior in it is trained." if stage == "prior" else " Its CLIP image encoder conditions the UNet; "
           "its prior turns validation prompts into image embeddings."))
    add("--dataset_name", type=str, default=None,
        help="A dataset on the Hub, or a local folder that `datasets.load_dataset` understands (parquet, "
        "imagefolder...). Its `train` split is used.")
    add("--dataset_config_name", type=str, default=None, help="The configuration of the dataset, if it has several.")
    add("--train_data_dir", type=str, default=None,
        help="A local image folder with a metadata.jsonl or metadata.csv that gives each file_name a caption.")
    add("--image_column", type=str, default="image", help="The dataset column that holds the images.")
    add("--max_train_samples", type=int, default=None,
        help="Train on the first N samples only (quicker runs, debugging).")
    add("--validation_prompts", type=str, default=None, nargs="+",
        help="Prompts rendered every --validation_epochs epochs and at the end, logged to the tracker and saved "
        "under OUTPUT_DIR/validation.")
    add("--validation_prompt", type=str, default=None,
        help="One validation prompt (the flag of the reference LoRA scripts); added to --validation_prompts.")
    add("--num_validation_images", type=int, default=None,
        help="Images per validation prompt. Default: 4 with --validation_prompt (as the reference LoRA scripts), "
        "1 otherwise.")
    add("--validation_inference_steps", type=int, default=25,
        help="Denoising steps of each validation stage (the pipelines' defaults of 25 + 100 are slow for "
        "frequent checks).")
    add("--validation_guidance_scale", type=float, default=4.0, help="Classifier-free guidance of validation.")
    add("--output_dir", type=str, default="kandi_2_2-model-finetuned",
        help="Where checkpoints, logs, validation images and the final pipeline are written.")
    add("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    add("--seed", type=int, default=None,
        help="Seed for reproducible training: data order, noise and timesteps. Without it a random seed is drawn "
        "and recorded in each checkpoint, so a resumed run still continues the same way.")
    add("--resolution", type=int, default=512,
        help="Training images are centre-cropped and resized to this size (a multiple of 8)."
        + (" The prior sees CLIP's own 224 px crop; this sets the validation render size." if stage == "prior" else ""))
    add("--train_batch_size", type=int, default=1, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=100, help="Epochs, unless --max_train_steps is given.")
    add("--max_train_steps", type=int, default=None,
        help="Total optimizer steps; overrides --num_train_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1,
        help="Micro-batches accumulated before each optimizer step.")
    add("--gradient_checkpointing", action="store_true",
        help=f"Recompute the {model}'s activations in the backward pass to save memory"
        + (" (new here: the reference prior script has no such option)." if stage == "prior" else "."))
    add("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after warm-up).")
    add("--lr_scheduler", type=str, default="constant",
        help=f"Learning-rate schedule, one of {', '.join(LR_SCHEDULERS)}. Warm-up and decay count optimizer "
        "steps, whatever the gradient accumulation and number of processes.")
    add("--lr_warmup_steps", type=int, default=500, help="Optimizer steps of linear warm-up.")
    add("--snr_gamma", type=float, default=None,
        help="Min-SNR-gamma loss weighting (https://huggingface.co/papers/2303.09556); 5.0 is recommended.")
    add("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW (CUDA only).")
    add("--allow_tf32", action="store_true", help="Allow TF32 matrix products on Ampere and newer GPUs.")
    add("--use_ema", action="store_true",
        help=f"Keep an exponential moving average of the {model} weights; used for validation and the final save.")
    add("--ema_decay", type=float, default=0.9999, help="Decay of --use_ema.")
    add("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory between updates.")
    add("--foreach_ema", action="store_true", help="Update the EMA weights with torch's faster foreach kernels.")
    add("--dataloader_num_workers", type=int, default=0,
        help="Subprocesses that load images; 0 loads them in the main process.")
    add("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    add("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    add("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    add("--push_to_hub", action="store_true", help="Upload the final pipeline and its model card to the Hub.")
    add("--hub_token", type=str, default=None, help="Hub token; by default the cached `hf auth login` token.")
    add("--hub_model_id", type=str, default=None,
        help="Hub repository to push to; by default the name of --output_dir under your account.")
    add("--hub_push_checkpoints", action="store_true",
        help="With --push_to_hub, also upload each checkpoint's model weights in the background while training "
        "goes on, so a preempted run's progress is safe on the Hub.")
    add("--logging_dir", type=str, default="logs",
        help="TensorBoard log folder, relative to --output_dir.")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the `accelerate config` value. Frozen models run in the half "
        "dtype, the trained model keeps fp32 master weights.")
    add("--report_to", type=str, default="tensorboard",
        help='Where to log: "tensorboard", "wandb", "comet_ml", "all" or "none".')
    add("--local_rank", type=int, default=-1, help="Set by the distributed launcher; leave it alone.")
    add("--checkpointing_steps", type=int, default=500,
        help="Save OUTPUT_DIR/checkpoint-STEP (full training state plus the model in diffusers format) every N "
        "optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None,
        help="Keep at most this many checkpoints; older ones are removed after a new one is complete.")
    add("--resume_from_checkpoint", type=str, default=None,
        help='Continue from "latest" or a folder name such as "checkpoint-1500"; with "latest" and no checkpoint, '
        "a new run starts.")
    add("--validation_epochs", type=int, default=5, help="Render the validation prompts every N epochs.")
    add("--tracker_project_name", type=str, default="text2image-fine-tune",
        help="Project name of the tracker (W&B project, TensorBoard run folder).")
    add("--use_lora", action="store_true",
        help=f"Train LoRA adapters on the {model}'s attention projections (through peft) instead of all weights.")
    add("--rank", type=int, default=4, help="LoRA rank (with --use_lora).")
    add("--lora_alpha", type=int, default=None, help="LoRA alpha (with --use_lora); defaults to --rank.")
    add("--conditioning_dropout_prob", type=float, default=0.0,
        help="Probability of training a sample unconditionally (empty caption for the prior, the zero-image "
        "embedding for the decoder), which makes classifier-free guidance at inference work better. 0.1 is usual.")
    add("--cache_embeddings", action="store_true",
        help="Compute the frozen encoders' outputs once, store them on disk keyed by a fingerprint of model, data, "
        "resolution and dtype, reuse them every epoch and run, and free the frozen encoders during training.")
    add("--embedding_cache_dir", type=str, default=None,
        help="Where --cache_embeddings stores its files (default OUTPUT_DIR/embedding_cache); share it between runs.")
    add("--torch_compile", action="store_true", help=f"Compile the {model} with torch.compile.")
    add("--skip_image_check", action="store_true",
        help="Do not decode every image once before training (faster start on huge, trusted data; an unreadable "
        "image then stops the run).")


def finish_args(args):
    """Resolve launcher-set and derived values shared by both scripts."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    prompts = list(args.validation_prompts or [])
    if args.validation_prompt:
        prompts.append(args.validation_prompt)
    args.validation_prompts = prompts or None
    if args.num_validation_images is None:
        args.num_validation_images = 4 if args.validation_prompt else 1
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    args.hub_repo_id = None  # set by create_hub_repo
    return args


def check_args(args, stage):
    """Errors that need nothing loaded: they come before any model or GPU time."""
    if args.dataset_name is None and args.train_data_dir is None:
        fail("Need training data: give --dataset_name (a Hub dataset or a local dataset folder) or --train_data_dir "
             "(an image folder with metadata.jsonl).")
    if args.dataset_name is not None and args.train_data_dir is not None:
        fail("Conflicting flags: give either --dataset_name or --train_data_dir, not both.")
    if args.train_data_dir is not None:
        if not os.path.isdir(args.train_data_dir):
            fail(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(args.train_data_dir).rglob("*")):
            fail(f"--train_data_dir {args.train_data_dir!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if args.resolution <= 0 or args.resolution % 8:
        fail(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_epochs",
                 "num_train_epochs", "validation_inference_steps", "num_validation_images", "rank"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        fail(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        fail(f"--max_train_samples must be at least 1, got {args.max_train_samples}.")
    if args.lr_scheduler not in LR_SCHEDULERS:
        fail(f"Unknown --lr_scheduler {args.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}.")
    if not 0.0 <= args.conditioning_dropout_prob < 1.0:
        fail(f"--conditioning_dropout_prob must be in [0, 1), got {args.conditioning_dropout_prob}.")
    if args.use_lora and args.use_ema:
        fail("Conflicting flags: --use_ema with --use_lora is not supported; the adapter is small, drop --use_ema.")
    if (args.offload_ema or args.foreach_ema) and not args.use_ema:
        fail("--offload_ema and --foreach_ema need --use_ema.")
    if args.hub_push_checkpoints and not args.push_to_hub:
        fail("--hub_push_checkpoints needs --push_to_hub.")
    trackers = report_targets(args.report_to)
    if "wandb" in trackers and args.hub_token is not None:
        fail("--report_to wandb with --hub_token would expose your token in the W&B run config; log in with "
             "`hf auth login` and drop --hub_token.")
    for tracker, package in (("wandb", "wandb"), ("tensorboard", "tensorboard"), ("comet_ml", "comet_ml")):
        if tracker in trackers and args.report_to != "all" and not _installed(package):
            fail(f"--report_to {tracker} needs the `{package}` package: pip install {package}")
    if args.use_8bit_adam and not _installed("bitsandbytes"):
        fail("--use_8bit_adam needs bitsandbytes (CUDA only): pip install bitsandbytes")
    if getattr(args, "enable_xformers_memory_efficient_attention", False) and not _installed("xformers"):
        fail("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
             "(PyTorch's own scaled-dot-product attention is used by default and is as fast on recent GPUs).")
    if args.use_lora and not _installed("peft"):
        fail("--use_lora needs peft: pip install peft")
    if args.resume_from_checkpoint is None:
        earlier = [os.path.basename(path) for _, path in list_checkpoints(args.output_dir)]
        if earlier:  # a new run would overwrite them step by step, and rotation would delete its own first
            fail(f"--output_dir {args.output_dir!r} already holds checkpoints of an earlier run "
                 f"({', '.join(earlier[-3:])}). Add --resume_from_checkpoint latest to continue it, or choose "
                 "another --output_dir to start a new run.")
    if args.resume_from_checkpoint not in (None, "latest"):
        name = os.path.basename(os.path.normpath(args.resume_from_checkpoint))
        if not CHECKPOINT_RE.match(name):
            fail(f'--resume_from_checkpoint takes "latest" or a folder named checkpoint-<step>, got '
                 f"{args.resume_from_checkpoint!r}.")


def report_targets(report_to):
    if report_to == "all":
        return [name for name in ("tensorboard", "wandb", "comet_ml") if _installed(name)]
    if report_to in (None, "none", ""):
        return []
    return [report_to]


def _installed(package):
    import importlib.util

    return importlib.util.find_spec(package) is not None


def check_model_repo(path, subfolders, flag):
    """A local model folder must have the components the script loads; say which are missing."""
    if os.path.isdir(path):
        missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
        if missing:
            fail(f"{flag} {path!r} has no {', '.join(missing)} subfolder(s); expected a Kandinsky 2.2 model folder "
                 f"with {', '.join(subfolders)}.")
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        fail(f"{flag} {path!r} is neither a model folder nor a Hub model id.")


@contextlib.contextmanager
def loading(what, flag, path):
    """Turn the loaders' deep tracebacks into one line that names the flag to fix."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        fail(f"Could not load the {what} from {flag} {path!r}: {first_line(error)}")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_training_data(args, accelerator, caption_column=None):
    """Load the train split, check its columns and captions, and drop unreadable images (reported by name). The
    main process goes first, so that the other processes find its downloads and checks in the datasets cache."""
    with accelerator.main_process_first():
        return _load_training_data(args, caption_column)


def _load_training_data(args, caption_column):
    import datasets

    if args.dataset_name is not None:
        try:
            loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        except Exception as error:  # datasets raises many types for "not found / offline / bad format"
            fail(f"Could not load --dataset_name {args.dataset_name!r}: {first_line(error)}")
    else:
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
        except Exception as error:  # typically a malformed metadata.jsonl / metadata.csv
            fail(f"Could not read the image folder --train_data_dir {args.train_data_dir!r} and its metadata file: "
                 f"{str(error).strip().splitlines()[-1]}")
    if "train" not in loaded:
        fail(f"The dataset has no 'train' split (splits: {', '.join(loaded)}).")
    dataset = loaded["train"]
    columns = dataset.column_names
    source = args.dataset_name or args.train_data_dir
    if args.image_column not in columns:
        fail(f"--image_column {args.image_column!r} is not a column of {source!r}; its columns are: "
             f"{', '.join(columns)}.")
    if caption_column is not None and caption_column not in columns:
        fail(f"--caption_column {caption_column!r} is not a column of {source!r}; its columns are: "
             f"{', '.join(columns)}.")
    keep = [args.image_column] + ([caption_column] if caption_column else [])
    dataset = dataset.remove_columns([c for c in columns if c not in keep])
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        fail(f"The dataset {source!r} is empty.")
    if caption_column is not None:
        bad = [i for i, c in enumerate(dataset[caption_column]) if caption_text(c) is None]
        if bad:
            fail(f"{len(bad)} sample(s) have a missing or non-string caption in column {caption_column!r} "
                 f"(rows {', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''}); fix or drop them.")
    # Decode lazily through our own loader, so that a bad file is reported instead of crashing a worker.
    if isinstance(dataset.features[args.image_column], datasets.Image):
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    report = ImageReport()
    if not args.skip_image_check:
        dataset = drop_unreadable(dataset, args.image_column, report)
    return dataset, report


def caption_text(value):
    """A caption as one string: lists (several captions per image) give their first entry."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, str) else None


@dataclass
class ImageReport:
    skipped: list = field(default_factory=list)

    def summary(self):
        if not self.skipped:
            return "all images readable"
        return f"{len(self.skipped)} unreadable image(s) skipped: {', '.join(self.skipped[:20])}" + (
            ", ..." if len(self.skipped) > 20 else "")


def image_name(value):
    if isinstance(value, dict):
        return value.get("path") or "<bytes>"
    if isinstance(value, str):  # a column of file paths
        return value
    return getattr(value, "filename", None) or f"<{type(value).__name__}>"


def open_rgb(value):
    """Open a dataset image cell (PIL image, {path, bytes} dict or path) as an RGB image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            import io

            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            image = Image.open(value["path"])
    else:
        image = Image.open(value)
    image.load()
    return to_rgb(image)


def to_rgb(image):
    """Convert any PIL mode to RGB the way a person would expect it to look."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: `convert("RGB")` would clip everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels go on white, not on the black that a plain conversion gives.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _check_images(values, indices):
    """datasets.map function: for each image, an empty string if it decodes, else why it does not; and its name
    (the file, or the row of a data set that stores the bytes)."""
    errors = []
    for value in values:
        try:
            open_rgb(value)
            errors.append("")
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            errors.append(f"{type(error).__name__}: {error}")
    names = [image_name(value) for value in values]
    return {"unreadable": errors,
            "name": [f"row {i} {name}" if name.startswith("<") else name for i, name in zip(indices, names)]}


def drop_unreadable(dataset, image_column, report, num_proc=None):
    """Decode every image once and keep the readable ones, naming the others in the log. The images stream through
    `datasets.map` (never all in memory at once), in parallel on large data; datasets caches the verdicts, so the
    other processes of a multi-GPU run and later runs on the same data do not decode again."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if num_proc is None:  # parallel processes pay for their start-up only on large data sets
        num_proc = min(os.cpu_count() or 1, len(dataset) // 2000) or None
    verdicts = dataset.map(_check_images, input_columns=image_column, with_indices=True, batched=True, batch_size=64,
                           remove_columns=dataset.column_names, num_proc=num_proc, desc="Checking images")
    keep = []
    for index, (error, name) in enumerate(zip(verdicts["unreadable"], verdicts["name"])):
        if error:
            report.skipped.append(name)
            logger.warning(f"Skipping unreadable image {name}: {error}")
        else:
            keep.append(index)
    if not keep:
        fail(f"None of the {len(dataset)} images could be read ({report.summary()}).")
    if report.skipped:
        dataset = dataset.select(keep)
    return dataset


def center_crop_resize(image, resolution):
    """Deterministic centre crop to a square, then a bicubic resize (the decoder's transform)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)


class TrainingSamples(torch.utils.data.Dataset):
    """Index -> dict of tensors, built by the script's `make_sample(image, row)`; keeps the sample index."""

    def __init__(self, dataset, image_column, make_sample):
        self.dataset, self.image_column, self.make_sample = dataset, image_column, make_sample

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        sample = self.make_sample(open_rgb(row[self.image_column]), row)
        sample["index"] = index
        return sample


def collate(samples):
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


# --------------------------------------------------------------------------------------------------------------
# Frozen-output cache
# --------------------------------------------------------------------------------------------------------------


def model_fingerprint(*models):
    """Config plus a strided sample of every weight: cheap, and any fine-tune changes it."""
    digest = hashlib.sha256()
    for model in models:
        config = getattr(model, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """The frozen models' outputs per sample, computed once and stored as safetensors under a fingerprint.

    Every process encodes its own slice of the samples (in the training dtype, so the cached values are
    exactly what the uncached path computes), then all processes read all slices.
    """

    def __init__(self, root, fingerprint):
        self.folder = Path(root) / fingerprint[:24]
        self.fingerprint = fingerprint

    def complete(self):
        meta = self.folder / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == self.fingerprint

    def build(self, accelerator, samples, encode, batch_size):
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        rank, world = accelerator.process_index, accelerator.num_processes
        mine = list(range(rank, len(samples), world))
        self.folder.mkdir(parents=True, exist_ok=True)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(samples, mine), batch_size=batch_size,
                                             collate_fn=collate, num_workers=0)
        parts = {}
        for batch in tqdm(loader, desc=f"Caching frozen outputs ({rank + 1}/{world})",
                          disable=not accelerator.is_local_main_process):
            index = batch.pop("index")
            with torch.no_grad():
                out = encode(batch)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.detach().cpu())
            parts.setdefault("index", []).append(index)
        tensors = {key: torch.cat(values).contiguous() for key, values in parts.items()}
        save_file(tensors, str(self.folder / f"part-{rank:05d}-of-{world:05d}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (self.folder / "meta.json").write_text(json.dumps({"fingerprint": self.fingerprint, "parts": world,
                                                               "samples": len(samples)}))
        accelerator.wait_for_everyone()

    def load(self):
        meta = json.loads((self.folder / "meta.json").read_text())
        return CachedSamples(sorted(self.folder.glob(f"part-*-of-{meta['parts']:05d}.safetensors")))


class CachedSamples(torch.utils.data.Dataset):
    """The cached outputs of each sample, read row by row from the memory-mapped safetensors files: a cache larger
    than RAM works, and the processes of a multi-GPU run share the page cache instead of holding a copy each."""

    def __init__(self, files):
        from safetensors import safe_open

        self.files = [str(f) for f in files]
        self.location = {}  # sample index -> (file, row)
        for number, path in enumerate(self.files):
            with safe_open(path, "pt") as part:
                for row, index in enumerate(part.get_tensor("index").tolist()):
                    self.location[index] = (number, row)
                self.keys = [key for key in part.keys() if key != "index"]
        self._handles, self._pid = None, None

    def __getstate__(self):  # data-loader workers started with "spawn" get a copy without the open files
        return {**self.__dict__, "_handles": None, "_pid": None}

    def __len__(self):
        return len(self.location)

    def __getitem__(self, index):
        from safetensors import safe_open

        if self._pid != os.getpid():  # open the files once in each process (data-loader workers are forked)
            self._handles, self._pid = [safe_open(path, "pt") for path in self.files], os.getpid()
        number, row = self.location[index]
        part = self._handles[number]
        return {"index": index, **{key: part.get_slice(key)[row] for key in self.keys}}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir):
    """Complete checkpoints as (step, path), oldest first. Temporary or foreign folders are ignored."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if match and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(args):
    """The checkpoint folder to resume from, or None for a new run."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.warning(f"No complete checkpoint in {args.output_dir!r}; starting a new training run.")
            return None
        return checkpoints[-1][1]
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(os.path.normpath(path)))
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        available = ", ".join(os.path.basename(p) for _, p in list_checkpoints(args.output_dir)) or "none"
        fail(f"Checkpoint {args.resume_from_checkpoint!r} does not exist or is incomplete in {args.output_dir!r} "
             f"(complete checkpoints: {available}).")
    return path


def inject_fault(point):
    """Test hook: KANDINSKY_TRAIN_FAULT=<point>:<SIGNAL> sends this process a real signal at that point (only the
    process of rank KANDINSKY_TRAIN_FAULT_RANK when that is set)."""
    spec = os.environ.get("KANDINSKY_TRAIN_FAULT", "")
    rank = os.environ.get("KANDINSKY_TRAIN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if spec and spec.rsplit(":", 1)[0] == point:
        os.kill(os.getpid(), getattr(signal, "SIG" + spec.rsplit(":", 1)[1]))


def save_checkpoint(accelerator, output_dir, step, state, total_limit, before_remove=None):
    """Write checkpoint-STEP atomically: into a temporary folder, renamed when complete; rotate after.
    before_remove(path) runs before an old checkpoint is deleted (to let its background upload finish)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp)
    inject_fault(f"save:{step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        if os.path.isdir(final):  # a checkpoint of this step from an earlier, abandoned run
            shutil.rmtree(final)
        os.replace(temp, final)
        for name in os.listdir(output_dir):  # leftovers of saves that were killed
            if name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                if before_remove is not None:
                    before_remove(old)
                logger.info(f"Removing old checkpoint {old}")
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next optimizer step and exits."""

    def __init__(self):
        self.signal = None
        self._pending = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        follow_launcher()

    def _handle(self, signum, frame):
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            return  # keep the first reason (Ctrl-C also ends the launcher, which then means a SIGTERM here)
        self.signal = signum

    def requested(self, accelerator):
        if accelerator.num_processes == 1:
            return self.signal is not None
        # Every rank must stop at the same step, or a barrier hangs: they agree through an all-reduce. Its result
        # is read one step later, once the GPU has finished the step it was queued behind, so no step waits for
        # the host (all ranks stop one step after the signal, alike).
        local = torch.tensor(float(self.signal is not None), device=accelerator.device)
        agreed, self._pending = self._pending, accelerator.reduce(local, "sum")
        flag = agreed is not None and bool(agreed.item() > 0)
        if flag and self.signal is None:
            self.signal = signal.SIGTERM
        return flag


_PARENT_AT_START = os.getppid()


def follow_launcher():
    """`accelerate launch` with one process dies on SIGTERM without passing it on (Kubernetes and `kill PID`
    signal only the launcher), which would leave training running orphaned until a SIGKILL loses its progress.
    Ask Linux to send this process SIGTERM when the launcher dies; only under a launcher, so that a run started
    with `nohup python ...` does not stop with the shell that started it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open(f"/proc/{_PARENT_AT_START}/cmdline", "rb") as f:
            parent = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if not re.search(r"accelerate|torchrun|torch\.distributed\.(run|launch)", parent):
        return
    import ctypes

    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM)) != 0:
        return
    if os.getppid() != _PARENT_AT_START:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------------------------------------------
# Training loop pieces
# --------------------------------------------------------------------------------------------------------------


def min_snr_weights(noise_scheduler, timesteps, gamma):
    """Min-SNR-gamma weights for the scheduler's prediction type (x0: min(snr, g); eps: /snr; v: /(snr+1))."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    elif prediction_type != "sample":
        raise ValueError(f"Unknown prediction type {prediction_type}")
    return weights


def diffusion_loss(pred, target, noise_scheduler, timesteps, snr_gamma):
    """MSE, optionally Min-SNR weighted per sample."""
    import torch.nn.functional as F

    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    return (loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def step_seed(seed, rank, epoch, batch_index):
    """A seed per (process, epoch, micro-batch): the noise is a function of the position in training, so a resumed
    run draws exactly what an uninterrupted one draws, with no random state to save."""
    mixed = hashlib.sha256(f"{seed}/{rank}/{epoch}/{batch_index}".encode()).digest()
    return int.from_bytes(mixed[:8], "little") & ((1 << 63) - 1)


def make_optimizer(args, parameters, device):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls, extra = bnb.optim.AdamW8bit, {}
    else:
        # The fused CUDA kernel is the fastest AdamW there is; CPU keeps the default implementation.
        optimizer_cls, extra = torch.optim.AdamW, ({"fused": True} if device.type == "cuda" else {})
    return optimizer_cls(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)


def weight_dtype_of(accelerator):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    trackers = report_targets(args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # A seedable sampler gives every epoch a fixed order, which `skip_first_batches` needs to resume exactly.
        # Non-blocking copies of the (pinned, on CUDA) batches: a blocking copy would make the host wait for the
        # GPU to finish the previous step before it could queue the next one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    import datasets
    import diffusers
    import transformers

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")
    for lib in (datasets, transformers, diffusers):
        (lib.utils.logging.set_verbosity_warning if accelerator.is_local_main_process
         else lib.utils.logging.set_verbosity_error)()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Training shapes are fixed (one resolution, one batch size), so cuDNN's one-off search for the fastest
    # convolution algorithms pays for itself within a few steps.
    torch.backends.cudnn.benchmark = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def resolve_seed(args, resume_path, accelerator):
    """The run's base seed: the flag, else the one recorded in the checkpoint, else a fresh one drawn by the main
    process (every process must shuffle the data alike for the shards not to overlap)."""
    from accelerate.utils import broadcast_object_list

    if resume_path is not None:
        with open(os.path.join(resume_path, STATE_FILE)) as f:
            recorded = json.load(f).get("seed")
        if args.seed is not None and recorded is not None and recorded != args.seed:
            logger.warning(f"--seed {args.seed} differs from the checkpoint's seed {recorded}; using {args.seed}.")
        return args.seed if args.seed is not None else recorded
    if args.seed is not None:
        return args.seed
    return broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]


class LaggedLogger:
    """Log a step's figures when the next step ends, so reading them never stalls the GPU pipeline."""

    def __init__(self, accelerator, progress):
        self.accelerator, self.progress, self.pending = accelerator, progress, None

    def push(self, step, values):
        self.flush()
        self.pending = (step, values)

    def flush(self):
        if self.pending is None:
            return
        step, values = self.pending
        self.pending = None
        logs = {k: (v.item() if torch.is_tensor(v) else v) for k, v in values.items()}
        self.progress.set_postfix(loss=f"{logs['train_loss']:.4g}", lr=f"{logs['lr']:.3g}", refresh=False)
        self.accelerator.log(logs, step=step)


def log_images(accelerator, images, step):
    """images: list of (prompt, PIL image). TensorBoard gets one grid per prompt, W&B captioned images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, (prompt, image) in enumerate(images):
                tracker.writer.add_image(f"validation/{i:02d}: {prompt[:60]}", np.asarray(image), step,
                                         dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {prompt}")
                                        for i, (prompt, image) in enumerate(images)]}, step=step)


def save_validation_images(output_dir, images, step):
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, (prompt, image) in enumerate(images):
        image.save(os.path.join(folder, f"step-{step:06d}-{i:02d}.png"))


def render(decoder_pipe, args, image_embeds, negative_image_embeds, generator):
    """One validation image from image embeddings, at the training resolution and the validation step count."""
    return decoder_pipe(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds,
                        height=args.resolution, width=args.resolution,
                        num_inference_steps=args.validation_inference_steps,
                        guidance_scale=args.validation_guidance_scale, generator=generator).images[0]


@dataclass
class Stage:
    """What a script plugs into the shared loop."""

    name: str  # "prior" or "unet": the subfolder of the trained model in checkpoints
    model: torch.nn.Module  # the trained model, unwrapped
    model_cls: type
    encode: Callable  # batch of raw samples -> dict of frozen-model outputs (no grad)
    loss: Callable  # (wrapped model, outputs of encode, generator) -> scalar loss
    validate: Callable  # (model with the weights to show) -> list of (prompt, PIL image)
    make_sample: Callable  # (RGB image, dataset row) -> dict of tensors for `encode`
    frozen_models: tuple  # the encoders whose outputs `encode` returns: fingerprinted, freed after caching
    cache_key: dict = field(default_factory=dict)  # what, beside data and frozen weights, the cache depends on


@contextlib.contextmanager
def on_device(device, *models):
    """Bring models that wait on the CPU (frozen encoders after caching, validation-only models) to the device."""
    homes = [next(m.parameters()).device for m in models]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(models, homes):
            m.to(home)


def check_ranks_agree(accelerator, model):
    """Data parallelism must leave every process with the same weights: compare a checksum across ranks."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        checksums = accelerator.gather(checksum.to(accelerator.device)).cpu()
    if not torch.all(checksums == checksums[0]):
        raise RuntimeError(f"The processes ended with different weights (checksums {checksums.tolist()}).")
    accelerator.print(f"Trained weights are identical on all {accelerator.num_processes} processes.")


def count_parameters(model, trainable_only=True):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def add_lora(args, model, target_modules):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=target_modules))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters train in fp32 even when the base is half precision


def train(args, accelerator, stage, dataset, report):
    """The Accelerate loop shared by both stages: data, optimizer, schedule, resume, EMA, checkpoints,
    preemption, logging and validation. Returns the EMA object (or None) for the script's final save."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    resume_path = resolve_resume(args)
    seed = resolve_seed(args, resume_path, accelerator)
    accelerator.dataloader_config.data_seed = seed  # read when the data loader is prepared
    model = stage.model
    device = accelerator.device
    samples = TrainingSamples(dataset, args.image_column, stage.make_sample)

    # Frozen outputs: cached once, or recomputed every step.
    if args.cache_embeddings:
        from datasets.fingerprint import Hasher

        key = {"data": dataset._fingerprint, "frozen": model_fingerprint(*stage.frozen_models),
               "dtype": str(weight_dtype_of(accelerator)), **stage.cache_key}
        cache = EmbeddingCache(args.embedding_cache_dir or os.path.join(args.output_dir, "embedding_cache"),
                               Hasher.hash(key))
        if cache.complete():
            logger.info(f"Reusing cached frozen outputs from {cache.folder}")
        else:
            cache.build(accelerator, samples, stage.encode, args.train_batch_size)
        train_samples, encode = cache.load(), None
        for frozen in stage.frozen_models:  # not needed until validation, which brings back what it uses
            frozen.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        train_samples, encode = samples, stage.encode

    dataloader = torch.utils.data.DataLoader(
        train_samples, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda",
        persistent_workers=args.dataloader_num_workers > 0)
    dataloader = accelerator.prepare(dataloader)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params, device)
    # Accelerate steps a prepared scheduler once per process for each optimizer step, so lengths are in
    # optimizer steps times processes (not times accumulation steps, as the reference scripts do).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)

    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=stage.model_cls,
                       model_config=model.config, foreach=args.foreach_ema)
        if not args.offload_ema:
            ema.to(device)
        elif device.type == "cuda":
            ema.pin_memory()  # faster copies to and from the GPU at each update

    def save_hook(models, weights, output_dir):
        # Every rank pops the weights it handles (DeepSpeed-safe); only the main process writes.
        for i, m in enumerate(models):
            if isinstance(accelerator.unwrap_model(m), stage.model_cls):
                if accelerator.is_main_process:
                    unwrapped = accelerator.unwrap_model(m)
                    if args.use_lora:
                        unwrapped.save_lora_adapter(os.path.join(output_dir, f"{stage.name}_lora"))
                    else:
                        unwrapped.save_pretrained(os.path.join(output_dir, stage.name))
                    if ema is not None:
                        ema.save_pretrained(os.path.join(output_dir, f"{stage.name}_ema"))
                if weights:
                    weights.pop(i)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            unwrapped = accelerator.unwrap_model(models[i])
            if not isinstance(unwrapped, stage.model_cls):
                continue
            if args.use_lora:
                from peft.utils import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(unwrapped, load_file(
                    os.path.join(input_dir, f"{stage.name}_lora", "pytorch_lora_weights.safetensors")))
            else:
                loaded = stage.model_cls.from_pretrained(os.path.join(input_dir, stage.name))
                unwrapped.load_state_dict(loaded.state_dict())
                del loaded
            if ema is not None:
                loaded_ema = EMAModel.from_pretrained(os.path.join(input_dir, f"{stage.name}_ema"), stage.model_cls,
                                                      foreach=args.foreach_ema)
                ema.load_state_dict(loaded_ema.state_dict())
                ema.to(device if not args.offload_ema else "cpu")
                del loaded_ema
            models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if args.torch_compile:
        model = torch.compile(model)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)
        with open(os.path.join(resume_path, STATE_FILE)) as f:
            recorded = json.load(f)
        global_step = recorded["global_step"]
        if recorded.get("steps_per_epoch") not in (None, steps_per_epoch):
            logger.warning("The data or batch settings changed since the checkpoint; the resumed data order "
                           "will not match an uninterrupted run.")
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
                  if k != "hub_token"}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(
        f"***** Training the {stage.name}: {len(train_samples)} examples ({report.summary()}), {num_epochs} epochs, "
        f"{max_steps} optimizer steps, batch {args.train_batch_size} per device x {accelerator.num_processes} "
        f"process(es) x {args.gradient_accumulation_steps} accumulation = {total_batch}, "
        f"{count_parameters(accelerator.unwrap_model(model)):,} trainable parameters, precision "
        f"{accelerator.mixed_precision}, frozen outputs {'cached' if encode is None else 'computed every step'}, "
        f"seed {seed} *****")

    stop = StopRequest()
    progress = tqdm(range(max_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    lagged = LaggedLogger(accelerator, progress)
    generator = torch.Generator(device=device)
    step_loss = torch.zeros((), device=device)
    micro_batches = 0
    step_start = time.perf_counter()

    def checkpoint_state(epoch):
        return {"global_step": global_step, "epoch": epoch, "seed": seed, "steps_per_epoch": steps_per_epoch,
                "skipped_images": report.skipped}

    def with_ema_weights(fn):
        unwrapped = accelerator.unwrap_model(model)
        if ema is None:
            return fn(unwrapped)
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
        try:
            return fn(unwrapped)
        finally:
            ema.restore(unwrapped.parameters())

    def run_validation(step):
        if not args.validation_prompts or not accelerator.is_main_process:  # one process renders
            return []
        images = with_ema_weights(stage.validate)
        log_images(accelerator, images, step)
        save_validation_images(args.output_dir, images, step)
        return images

    # KANDINSKY_TRAIN_TRACE=FILE appends the sample indices of every micro-batch (a debugging aid; tests use it
    # to prove that a resumed run sees exactly the data an uninterrupted one sees).
    trace = open(os.environ["KANDINSKY_TRAIN_TRACE"], "a") if os.environ.get("KANDINSKY_TRAIN_TRACE") else None
    pushes = {}  # checkpoint path -> its background upload
    done = global_step >= max_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        model.train()
        dataloader.set_epoch(epoch)
        start = skip_batches if epoch == first_epoch else 0
        active = accelerator.skip_first_batches(dataloader, start) if start else dataloader
        for batch_index, batch in enumerate(active, start=start):
            inject_fault(f"micro:{epoch * len(dataloader) + batch_index}")
            if trace is not None:
                trace.write(json.dumps({"rank": accelerator.process_index, "epoch": epoch, "micro": batch_index,
                                        "index": batch["index"].tolist()}) + "\n")
                trace.flush()
            generator.manual_seed(step_seed(seed, accelerator.process_index, epoch, batch_index))
            with accelerator.accumulate(model):
                batch.pop("index", None)
                if encode is not None:
                    with torch.no_grad():
                        # contiguous, as cached tensors are: the layout decides which kernels run
                        batch = {k: v.contiguous() for k, v in encode(batch).items()}
                loss = stage.loss(model, batch, generator)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            if ema is not None:
                if args.offload_ema:
                    ema.to(device, non_blocking=True)
                ema.step(accelerator.unwrap_model(model).parameters())
                if args.offload_ema:
                    ema.to("cpu", non_blocking=True)
            elapsed = time.perf_counter() - step_start
            values = {"train_loss": accelerator.reduce(step_loss / micro_batches, "mean"),
                      "lr": lr_scheduler.get_last_lr()[0],
                      "samples_per_second": micro_batches * args.train_batch_size * accelerator.num_processes
                      / max(elapsed, 1e-9)}
            if grad_norm is not None:
                values["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm
            if device.type == "cuda":
                values["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            lagged.push(global_step, values)
            progress.update(1)
            step_loss = torch.zeros((), device=device)
            micro_batches = 0
            step_start = time.perf_counter()

            stopping = stop.requested(accelerator)
            if global_step % args.checkpointing_steps == 0 or stopping:
                path = save_checkpoint(accelerator, args.output_dir, global_step, checkpoint_state(epoch),
                                       args.checkpoints_total_limit,
                                       before_remove=lambda old: wait_for_pushes(pushes, old))
                accelerator.print(f"Saved {path}")
                if args.hub_push_checkpoints and accelerator.is_main_process:
                    pushes[path] = push_checkpoint(args, path, stage.name)
            if stopping:
                lagged.flush()
                name = signal.Signals(stop.signal).name
                accelerator.print(f"Received {name}: saved checkpoint-{global_step} and stopped. Continue with "
                                  f"--resume_from_checkpoint latest")
                wait_for_pushes(pushes)
                accelerator.end_training()
                sys.exit(0 if stop.signal == signal.SIGTERM else 128 + stop.signal)
            if global_step >= max_steps:
                done = True
                break
        if args.validation_prompts and (epoch % args.validation_epochs == 0) and not done:
            run_validation(global_step)
    lagged.flush()
    progress.close()
    if trace is not None:
        trace.close()
    check_ranks_agree(accelerator, model)
    final_images = run_validation(global_step)
    if report.skipped:
        accelerator.print(f"Data: {report.summary()}")
    wait_for_pushes(pushes)
    return accelerator.unwrap_model(model), ema, final_images


# --------------------------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------------------------


def create_hub_repo(args, accelerator):
    """With --push_to_hub, create (or find) the Hub repository before anything is trained, so that a missing login
    or a name that is not yours stops the run now rather than after its last step."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).name
    try:
        args.hub_repo_id = create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as error:  # offline, no token, no write access, name taken: all say the same to the user
        fail(f"--push_to_hub: could not create or reach the Hub repository {name!r} ({first_line(error)}). Log in "
             "with `hf auth login` (or give --hub_token), choose another --hub_model_id, or drop --push_to_hub.")


def push_checkpoint(args, path, subfolder):
    """Upload a checkpoint's model weights in a background thread (huggingface_hub's run_as_future)."""
    from huggingface_hub import upload_folder

    name = os.path.basename(path)
    return upload_folder(repo_id=args.hub_repo_id, folder_path=path, path_in_repo=name, token=args.hub_token,
                         allow_patterns=[f"{subfolder}/**", f"{subfolder}_ema/**", f"{subfolder}_lora/**"],
                         commit_message=f"Checkpoint {name}", run_as_future=True)


def wait_for_pushes(pushes, only=None):
    """Wait for the background uploads (of one checkpoint path, with `only`); a failure is a warning: the files
    are safe on disk."""
    for path in [only] if only is not None else list(pushes):
        future = pushes.pop(path, None)
        if future is None:
            continue
        try:
            future.result()
        except Exception as error:
            logger.warning(f"The upload of {path} to the Hub failed: {first_line(error)}")


def write_model_card(args, stage_title, base_model, inference_snippet, images, extra_yaml=None,
                     wandb_url=None):
    """README.md of the output folder, through huggingface_hub's ModelCard."""
    from huggingface_hub import ModelCard, ModelCardData

    if images:
        grid_path = os.path.join(args.output_dir, "val_imgs_grid.png")
        image_grid([image for _, image in images]).save(grid_path)
    data = ModelCardData(
        license="apache-2.0",  # the license of Kandinsky 2.2
        base_model=None if os.path.isdir(base_model) else base_model,  # the Hub only accepts model ids here
        datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else None,
        tags=["kandinsky", "text-to-image", "diffusers", "diffusers-training"],
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


def image_grid(images):
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def wandb_run_url(accelerator):
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return getattr(tracker.run, "url", None)
    return None


def publish(args, accelerator, stage_name, base_model, snippet, images, extra_yaml=None):
    """Write the model card of the saved output and, with --push_to_hub, upload the folder (no checkpoints, logs,
    validation images or cache)."""
    from huggingface_hub import upload_folder

    title = f"Kandinsky 2.2 {stage_name}" + (" LoRA" if args.use_lora else "")
    write_model_card(args, title, base_model, snippet, images, extra_yaml, wandb_url=wandb_run_url(accelerator))
    if args.push_to_hub:
        repo_id = args.hub_repo_id
        ignore = HUB_IGNORE + [args.logging_dir, f"{args.logging_dir}/**", "validation", "validation/**"]
        try:
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                          commit_message=f"Fine-tuned {title}", ignore_patterns=ignore)
        except Exception as error:  # the output is complete on disk: say so, and how to upload it later
            excludes = " ".join(f'--exclude "{pattern}"' for pattern in
                                dict.fromkeys(p.replace("/**", "/*") for p in ignore if "*" in p))
            fail(f"The upload to the Hub repository {repo_id!r} failed ({first_line(error)}). The fine-tuned {title} "
                 f"is saved in {args.output_dir}; upload it later with: hf upload {repo_id} {args.output_dir} . "
                 f"{excludes}")
        accelerator.print(f"Pushed {args.output_dir} to {repo_id}")
    accelerator.print(f"Saved the fine-tuned {title} to {args.output_dir}")


def main_guard(main):
    """Run main(); a UserError becomes one clear line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
