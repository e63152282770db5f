# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The command line both scripts accept: the flags of diffusers' reference scripts with their names, types and
defaults (tests/test_cli.py checks each one), then ours, in groups. Each script adds its own few flags."""

import argparse
import importlib.util
import os

from .images import RESAMPLING

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TRACKERS = ("tensorboard", "wandb", "comet_ml")
OPTIMIZERS = ("adamw", "adafactor", "prodigy", "adamw4bit")


def add_common_arguments(parser, stage):
    """stage: "prior" or "decoder"; it changes the help text, never a name or a default."""
    model = "PriorTransformer" if stage == "prior" else "UNet"
    for group in (_models_and_data, _optimization, _checkpoints, _validation, _tracking_and_hub, _speed, _memory):
        group(parser.add_argument, stage, model)
    _decoder_images(parser, stage)


def _models_and_data(add, stage, model):
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
    add("--skip_image_check", action="store_true",
        help="Do not decode every image once before training (faster start on huge, trusted data; an unreadable "
        "image then stops the run).")
    add("--streaming", action="store_true",
        help="Read the data as a stream of shards (parquet, WebDataset .tar, an image folder) instead of loading and "
        "checking it whole: for data sets larger than the disk. Each process reads its own shards; needs "
        "--max_train_steps, and --num_train_epochs counts passes over the shards. Bad samples are skipped as they "
        "come.")
    add("--shuffle_buffer_size", type=int, default=1000,
        help="With --streaming: samples in the shuffle buffer, drawn from with --seed and the epoch.")
    add("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    add("--output_dir", type=str, default="kandi_2_2-model-finetuned",
        help="Where checkpoints, logs, validation images and the final pipeline are written.")
    add("--seed", type=int, default=None,
        help="Seed for reproducible training: data order, noise and timesteps. Without it a random seed is drawn "
        "and recorded in each checkpoint, so a resumed run still continues the same way.")
    add("--resolution", type=int, default=512,
        help="Training images are centre-cropped and resized to this size (a multiple of 8)."
        + (" The prior sees CLIP's own 224 px crop; this sets the validation render size." if stage == "prior" else
           " With --enable_bucket, to a shape of about this many pixels squared."))
    add("--dataloader_num_workers", type=int, default=0,
        help="Subprocesses that load images; 0 loads them in the main process.")
    add("--local_rank", type=int, default=-1, help="Set by the distributed launcher; leave it alone.")


def _optimization(add, stage, model):
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
    add("--lr_warmup_steps", type=int, default=500,
        help='Optimizer steps of linear warm-up, for the schedules that have one ("constant" has none, as in the '
        'reference scripts: use "constant_with_warmup").')
    add("--snr_gamma", type=float, default=None,
        help="Min-SNR-gamma loss weighting (https://huggingface.co/papers/2303.09556); 5.0 is recommended.")
    add("--optimizer", type=str, default="adamw", choices=OPTIMIZERS,
        help="adamw (torch's, fused on CUDA: 8 bytes of state a weight); adafactor (transformers' Adafactor at "
        "--learning_rate, with factored second moments, a convolution's over its output channels and the rest, and "
        "no first moment: almost no optimizer memory; the official Kandinsky 2.1 training's choice); prodigy (the "
        "prodigyopt package: it estimates the step size itself, give --learning_rate 1.0); adamw4bit (torchao's "
        "4-bit AdamW: about 1 byte a weight). --adam_weight_decay applies to all four; --adam_beta1/2 and "
        "--adam_epsilon to the AdamWs and prodigy.")
    add("--use_8bit_adam", action="store_true",
        help="Use bitsandbytes' 8-bit AdamW (about 2 bytes of state a weight; runs on CUDA and the CPU).")
    add("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    add("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    add("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    add("--use_ema", action="store_true",
        help=f"Keep an exponential moving average of the {model} weights; used for validation and the final save.")
    add("--ema_decay", type=float, default=0.9999, help="Decay of --use_ema.")
    add("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory between updates.")
    add("--foreach_ema", action="store_true", help="Update the EMA weights with torch's faster foreach kernels.")
    add("--use_lora", action="store_true",
        help=f"Train LoRA adapters on the {model}'s attention projections (through peft) instead of all weights.")
    add("--rank", type=int, default=4, help="LoRA rank (with --use_lora).")
    add("--lora_alpha", type=int, default=None, help="LoRA alpha (with --use_lora); defaults to --rank.")
    add("--conditioning_dropout_prob", type=float, default=0.0,
        help="Probability of training a sample unconditionally (empty caption for the prior, the zero-image "
        "embedding for the decoder), which makes classifier-free guidance at inference work better. 0.1 is usual.")


def _checkpoints(add, stage, model):
    add("--checkpointing_steps", type=int, default=500,
        help="Save OUTPUT_DIR/checkpoint-STEP (full training state plus the model in diffusers format) every N "
        "optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None,
        help="Keep at most this many checkpoints; older ones are removed after a new one is complete.")
    add("--resume_from_checkpoint", type=str, default=None,
        help='Continue from "latest" or a folder name such as "checkpoint-1500"; with "latest" and no checkpoint, '
        "a new run starts.")


def _validation(add, stage, model):
    add("--validation_prompts", type=str, default=None, nargs="+",
        help="Prompts rendered every --validation_epochs epochs and at the end, logged to the tracker and saved "
        "under OUTPUT_DIR/validation.")
    add("--validation_prompt", type=str, default=None,
        help="One validation prompt (the flag of the reference LoRA scripts); added to --validation_prompts.")
    add("--num_validation_images", type=int, default=None,
        help="Images per validation prompt. Default: 4 with --validation_prompt (as the reference LoRA scripts), "
        "1 otherwise.")
    add("--validation_epochs", type=int, default=5,
        help="Render the validation prompts every N epochs (unless --validation_steps is given).")
    add("--validation_steps", type=int, default=None,
        help="Render the validation prompts and evaluate the held-out set every N optimizer steps. Default: the "
        "prompts every --validation_epochs epochs and the held-out evaluation every epoch.")
    add("--validation_split", type=float, default=None,
        help="Hold out this share of the data set (e.g. 0.05; after --max_train_samples), never trained on, and log "
        "its loss at fixed timesteps and noise (eval_loss)"
        + (" and the cosine between predicted and true CLIP image embeddings (eval_cosine)" if stage == "prior"
           else "") + ". The rows held out depend only on the data, never on --seed or the number of processes.")
    add("--validation_data_dir", type=str, default=None,
        help="A separate held-out image folder (laid out like --train_data_dir) instead of --validation_split.")
    add("--validation_dataset_name", type=str, default=None,
        help="A separate held-out data set (Hub or local, same columns as the training data) instead of "
        "--validation_split; its validation split, else its test split, else its train split.")
    add("--validation_inference_steps", type=int, default=25,
        help="Denoising steps of each validation stage (the pipelines' defaults of 25 + 100 are slow for "
        "frequent checks).")
    add("--validation_guidance_scale", type=float, default=4.0, help="Classifier-free guidance of validation.")


def _tracking_and_hub(add, stage, model):
    add("--report_to", type=str, default="tensorboard",
        help='Where to log: "tensorboard", "wandb", "comet_ml" (or another tracker accelerate knows, such as '
        '"mlflow"), "all" or "none".')
    add("--logging_dir", type=str, default="logs", help="TensorBoard log folder, relative to --output_dir.")
    add("--tracker_project_name", type=str, default="text2image-fine-tune",
        help="Project name of the tracker (W&B project, TensorBoard run folder).")
    add("--push_to_hub", action="store_true", help="Upload the final pipeline and its model card to the Hub.")
    add("--hub_token", type=str, default=None, help="Hub token; by default the cached `hf auth login` token.")
    add("--hub_model_id", type=str, default=None,
        help="Hub repository to push to; by default the name of --output_dir under your account.")
    add("--hub_push_checkpoints", action="store_true",
        help="With --push_to_hub, also upload each checkpoint's model weights in the background while training "
        "goes on, so a preempted run's progress is safe on the Hub.")


def _speed(add, stage, model):
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the `accelerate config` value. Frozen models run in the half "
        "dtype, the trained model keeps fp32 master weights (bf16 ones with --full_bf16).")
    add("--allow_tf32", action="store_true", help="Allow TF32 matrix products on Ampere and newer GPUs.")
    add("--cache_embeddings", action="store_true",
        help="Compute the frozen encoders' outputs once, store them on disk keyed by a fingerprint of model, data, "
        "resolution and dtype, reuse them every epoch and run, and free the frozen encoders during training.")
    add("--embedding_cache_dir", type=str, default=None,
        help="Where --cache_embeddings stores its files (default OUTPUT_DIR/embedding_cache); share it between runs.")
    add("--torch_compile", action="store_true", help=f"Compile the {model} with torch.compile.")


def _memory(add, stage, model):
    add("--fused_backward_pass", action="store_true",
        help="Step the optimizer for each weight inside the backward pass and free its gradient at once (kohya's "
        "sd-scripts name), so the gradients of the whole model never exist together. For --optimizer adamw (also "
        "8-bit), adamw4bit and adafactor, on one process; with --torch_compile each repeated block is compiled on its "
        "own, so that its gradients are freed as its backward ends. --max_grad_norm then clips each weight tensor's "
        "gradient on its own (as kohya's and OneTrainer's fused passes do), not their total norm; a threshold never "
        "reached gives the "
        "plain step's result. With --gradient_accumulation_steps > 1 the gradients accumulate as usual and each "
        "weight is stepped in the last micro-batch's backward pass: same result, but no memory saved.")
    add("--full_bf16", action="store_true",
        help=f"Keep the {model}'s trained weights in bf16, without an fp32 master copy: half their memory and their "
        "gradients'. Each update is computed in fp32 and rounded stochastically into the bf16 weight, so updates "
        "smaller than bf16's precision still count on average. The optimizer's states keep their own precision "
        "(AdamW's fp32: 8 bytes a weight; 8-bit and 4-bit AdamW's: about 2 and 1; Adafactor's factored ones are "
        "tiny) and --use_ema averages in fp32. Needs --mixed_precision bf16; "
        "not with --use_lora or Prodigy. Checkpoints and the final model hold the bf16 weights.")
    add("--estimate_memory", action="store_true",
        help="Print the peak GPU memory this command would reach (a table by part: weights, gradients, optimizer "
        "states, EMA, frozen models, activations) and exit, without training, without a GPU and reading only the "
        "models' configuration files. Plans for the precision the command asks for (the flag or the launcher's).")
    add("--memory_budget_gib", type=float, default=None,
        help="With --estimate_memory: the GPU memory to fit in (default: this machine's GPU, if any); when the "
        "estimate is over it, the memory flags that would bring it under are listed with their counted savings.")


# The decoder's image options; the prior accepts them only to refuse them by name (checks.py).
DECODER_OPTIONS = ("--enable_bucket", "--min_bucket_reso", "--max_bucket_reso", "--bucket_reso_steps", "--random_flip",
                   "--noise_offset", "--input_perturbation", "--prediction_type", "--image_interpolation_mode",
                   "--validation_resolutions")


def _decoder_images(parser, stage):
    """Aspect-ratio buckets under kohya's sd-scripts' names, and diffusers' Stable Diffusion script's options."""
    if stage == "prior":
        group = parser.add_argument_group(
            "decoder options (refused here)", "The prior trains on CLIP's own 224 px centre crop of each image, so "
            "aspect-ratio buckets, flips, the noise options and the resize filter do not apply to it: use them with "
            "train_text_to_image_decoder.py.")

        def add(flag, **kwargs):  # no default: a flag is in the parsed arguments only when it was given
            group.add_argument(flag, **{**kwargs, "default": argparse.SUPPRESS,
                                        "help": "(Decoder only; refused here.) " + kwargs["help"]})
    else:
        add = parser.add_argument_group("images: aspect-ratio buckets, augmentation, noise").add_argument
    add("--enable_bucket", action="store_true",
        help="Train at aspect-ratio buckets instead of square crops: shapes of about --resolution² pixels whose "
        "sides are multiples of what MoVQ and the UNet need; each image goes to the shape nearest its aspect ratio "
        "and is centre-cropped and resized to it; a micro-batch holds one shape. Bucket counts are printed at the "
        "start.")
    add("--min_bucket_reso", type=int, default=None,
        help="Smallest bucket side in pixels (with --enable_bucket). Default: half of --resolution.")
    add("--max_bucket_reso", type=int, default=None,
        help="Largest bucket side in pixels (with --enable_bucket). Default: twice --resolution.")
    add("--bucket_reso_steps", type=int, default=None,
        help="Bucket sides are multiples of this (with --enable_bucket). Default: what the decoder needs, MoVQ's "
        "and the UNet's downscaling together (64 for Kandinsky 2.2).")
    add("--random_flip", action="store_true",
        help="Mirror each training image horizontally with probability 1/2, drawn per image and epoch from the "
        "seed (resume stays exact); with --cache_embeddings both orientations are cached.")
    add("--noise_offset", type=float, default=0.0,
        help="The scale of noise offset (https://www.crosslabs.org/blog/diffusion-with-offset-noise): a random "
        "shift per image and latent channel added to the noise; 0.05 to 0.1 is usual.")
    add("--input_perturbation", type=float, default=0.0,
        help="The scale of input perturbation (https://huggingface.co/papers/2301.11706): the noisy input gets "
        "extra noise that the target does not have; 0.1 is recommended.")
    add("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
        help="What the UNet learns to predict. Default: the decoder scheduler's (epsilon for Kandinsky 2.2). The "
        "saved pipeline's scheduler carries it, so inference matches.")
    add("--image_interpolation_mode", type=str, default="bicubic", choices=list(RESAMPLING),
        help="Resampling filter of the training resize. Default: bicubic, the reference decoder script's "
        "(diffusers' Stable Diffusion script defaults to lanczos).")
    add("--validation_resolutions", type=str, default=None,
        help="Also render the validation prompts at these WIDTHxHEIGHT shapes, e.g. 768x1024,1024x768 "
        "(multiples of 64 for Kandinsky 2.2).")


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
    return args


def report_targets(report_to):
    """The trackers --report_to names ("all": those installed)."""
    if report_to == "all":
        return [name for name in TRACKERS if installed(name)]
    if report_to in (None, "none", ""):
        return []
    return [report_to]


def tracker_names():
    """Every tracker accelerate can log to, by --report_to name (each is also its package's import name)."""
    from accelerate.utils import LoggerType

    return [tracker.value for tracker in LoggerType if tracker.value != "all"]


def installed(package):
    return importlib.util.find_spec(package) is not None
