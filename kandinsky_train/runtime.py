# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What the run executes on: the Accelerator and its settings (logging, cuDNN, TF32), dtypes, the optimizer and
schedule, LoRA adapters, and moving models that wait on the CPU to the device while they are needed."""

import contextlib
import logging
import os
import sys
import warnings

import torch

from . import faults, optimizers
from .cli import report_targets

logger = logging.getLogger(__name__)


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_targets(args.report_to) or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # A seedable sampler gives every epoch a fixed order, which `skip_first_batches` needs to resume exactly.
        # Non-blocking copies of the (pinned, on CUDA) batches: a blocking copy would make the host wait for the
        # GPU to finish the previous step before it could queue the next one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
    )
    configure_logging(accelerator)
    configure_backends(args)
    if args.seed is not None:
        # As diffusers' scripts do: what draws from the global generators (peft's LoRA initialisation) repeats with
        # --seed. Training's noise and data order have generators of their own, seeded per step (exact resume).
        set_seed(args.seed)
    return accelerator


def configure_logging(accelerator):
    """Our INFO lines on the local main process; the libraries' warnings there and their errors elsewhere."""
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    # One line per saved file (accelerate), one per Hub request (huggingface_hub's HTTP clients): noise.
    for noisy in ("accelerate", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A stream's bad samples are met by the process that reads them: each process names its own.
    logging.getLogger("kandinsky_train.streaming").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")
    for lib in (datasets, transformers, diffusers):
        (lib.utils.logging.set_verbosity_warning if accelerator.is_local_main_process
         else lib.utils.logging.set_verbosity_error)()
    quiet_library_progress_bars()


def quiet_library_progress_bars():
    """No progress bar for what the libraries do in a blink and say nothing by: loading or writing each model's
    weights, a pipeline's components (transformers', diffusers'). Kept: ours (steps, caching, checking images, which
    is datasets' map), datasets' preparing of a data set and the Hub's downloads, whose bars tell how long a large
    one will take. (Pipelines' denoising bars are each pipeline's: set_progress_bar_config(disable=True).)"""
    import diffusers
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    downloads_shown = not are_progress_bars_disabled()
    with warnings.catch_warnings():  # the Hub's notice that HF_HUB_DISABLE_PROGRESS_BARS decides: it still does
        warnings.simplefilter("ignore")
        transformers.utils.logging.disable_progress_bar()  # turns the Hub's bars off too: back on as they were
        if downloads_shown:
            enable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def console_through_progress_bars():
    """While progress bars show, log records (ours and the libraries') and printed lines are written to the bars'
    stream through tqdm, which clears the bars, writes the line and redraws them below it: a bar stays one line,
    never split."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    loggers = [logging.getLogger(name) for name in ("", "diffusers", "transformers", "datasets")]
    lines = _LinesAboveBars(sys.stdout)
    try:
        with logging_redirect_tqdm(loggers), contextlib.redirect_stdout(lines):
            yield
    finally:
        lines.write("\n" if lines.pending else "")  # a line left open (print(..., end="")) is not lost


class _LinesAboveBars:
    """stdout for print(): whole lines; while a bar shows, written to the bar's stream (stderr) between clearing and
    redrawing it. Only one stream keeps its order on the way to the console: accelerate's launcher (1.16 on)
    relays the training process's stderr through a pipe of its own while stdout goes straight through, so a line
    written to stdout overtook the clearing of the bar and landed at the bar's tail."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text):
        from tqdm import tqdm

        whole, newline, self.pending = (self.pending + text).rpartition("\n")
        if newline:
            bars = [bar.fp for bar in list(tqdm._instances) if hasattr(bar, "start_t")]  # shown, not disabled
            stream = bars[0] if bars else self.stream
            with tqdm.external_write_mode(file=stream):
                stream.write(whole + newline)
                stream.flush()
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def configure_backends(args):
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Training shapes are fixed (one resolution, one batch size), so cuDNN's one-off search for the fastest
    # convolution algorithms pays for itself within a few steps.
    torch.backends.cudnn.benchmark = True


# Graphs one compiled model may hold: one per (micro-batch size, picture shape) trained at. A run without buckets
# needs two at most (a smaller last batch); with --enable_bucket two per bucket in use, so 64 covers 32 buckets.
# Past it, torch.compile runs the new shapes uncompiled (and warns).
COMPILED_SHAPES = 64


# The repeated blocks that --torch_compile compiles one by one with --fused_backward_pass (the outermost where they
# nest): the decoder UNet's ResNet and attention blocks, the prior's transformer blocks.
REGIONS = ("BasicTransformerBlock", "ResnetBlock2D", "Attention")


def compile_model(model, regional=False):
    """--torch_compile: one static graph per training shape. Left to guess, torch.compile turns a second shape (a
    bucket, a smaller last batch) into symbolic sizes, on which Inductor failed with the tiny decoder and buckets
    on the CPU ("cannot determine truth value of Relational"); static graphs are also the ones it tunes best.
    regional (--fused_backward_pass): each repeated block compiled on its own instead of the whole model. A compiled
    model's backward is one node that returns every weight's gradient at once, before any per-weight hook runs, so
    the fused pass would save almost nothing; a block's backward returns only its own, stepped and freed as it ends.
    Blocks of one shape share a graph; each shape of block is a graph, hence the higher limit."""
    limit = COMPILED_SHAPES * (16 if regional else 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    options = dict(dynamic=False, backend=faults.compile_backend())
    if not regional:
        return torch.compile(model, **options)
    compiled = []
    for name, module in model.named_modules():
        if type(module).__name__ in REGIONS and not any(name.startswith(f"{outer}.") for outer in compiled):
            module.compile(**options)
            compiled.append(name)
    return model


def weight_dtype_of(accelerator):
    """The dtype of the frozen models: the mixed-precision half type, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args, parameters, device):
    """--optimizer: AdamW (or bitsandbytes' 8-bit one), torchao's 4-bit AdamW, Adafactor or Prodigy, at
    --learning_rate."""
    if args.optimizer == "adafactor":
        # Our learning rate and schedule, as the official Kandinsky 2.1 training configures it: no step size of its
        # own (relative_step), no scaling by each weight's magnitude (scale_parameter), hence no warmup_init.
        return optimizers.factored_adafactor()(parameters, lr=args.learning_rate, relative_step=False,
                                               scale_parameter=False, warmup_init=False,
                                               weight_decay=args.adam_weight_decay)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if args.learning_rate != 1.0:
            logger.warning(f"Prodigy estimates the step size itself; --learning_rate {args.learning_rate} scales "
                           "that estimate (1.0 is the intended value).")
        return Prodigy(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                       weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "adamw4bit":
        optimizer_cls, extra = optimizers.adamw_4bit(), {}
    elif args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls, extra = bnb.optim.AdamW8bit, {}
    else:
        # The fused CUDA kernel is the fastest AdamW there is; CPU keeps the default implementation.
        optimizer_cls, extra = torch.optim.AdamW, ({"fused": True} if device.type == "cuda" else {})
    return optimizer_cls(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)


def make_lr_scheduler(args, optimizer, max_steps, num_processes):
    from diffusers.optimization import get_scheduler

    # Accelerate steps a prepared scheduler once per process for each optimizer step, so lengths are in
    # optimizer steps times processes (not times accumulation steps, as the reference scripts do).
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_steps * num_processes)


def set_schedule_position(lr_scheduler, optimizer_steps, num_processes):
    """Put the learning-rate schedule at an optimizer step. The schedule is a function of that step alone, while a
    checkpoint's scheduler state counts what stepped it: accelerate steps a prepared scheduler once per process, so
    a checkpoint written by another number of processes (or by the reference scripts, which count micro-batches)
    would shift warm-up and decay."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # below accelerate's wrapper
    scheduler.last_epoch = optimizer_steps * num_processes - 1
    scheduler.step()  # recomputes the optimizer's learning rates for the new position


def add_lora(args, model, target_modules):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=target_modules))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters train in fp32 even when the base is half precision


def count_parameters(model, trainable_only=True):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weight_checksums(model):
    """Two exact sums per tensor of its elements' bits, one weighted by position: any changed bit shows, and so
    does a swap of two elements (which the sum of the values would miss)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    with torch.no_grad():
        for p in model.parameters():
            bits = p.detach().reshape(-1).view(ints[p.element_size()]).long()
            position = torch.arange(1, bits.numel() + 1, device=bits.device)
            sums.append(torch.stack([bits.sum(), (bits * position).sum()]))  # int64 sums wrap alike on every rank
    return torch.stack(sums)


def frozen_device(args, accelerator):
    """Where the frozen encoders wait. With --cache_embeddings on the CPU: each comes to the device for its own
    caching pass (cache.frozen_outputs) and for the few encodings outside it, so the device never holds two at once
    (the prior's CLIP towers take 4.7 GiB together in half precision, the image tower alone 3.4). Else on the device,
    where every step runs them."""
    return torch.device("cpu") if args.cache_embeddings else accelerator.device


def freeze(model, args, accelerator):
    """A frozen model: in eval mode, without gradients, where frozen models wait (frozen_device)."""
    return model.eval().requires_grad_(False).to(frozen_device(args, accelerator))


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
    """Data parallelism must leave every process with the same weights: compare every tensor's checksums across
    ranks, and name the first that differs."""
    if accelerator.num_processes == 1:
        return
    names = [name for name, _ in model.named_parameters()]
    checksums = accelerator.gather(weight_checksums(model).to(accelerator.device)).cpu()
    checksums = checksums.reshape(accelerator.num_processes, len(names), 2)
    differ = (checksums != checksums[0]).any(dim=2).any(dim=0).nonzero().flatten().tolist()
    if differ:
        raise RuntimeError(f"The processes ended with different weights: {len(differ)} tensor(s) differ, the first "
                           f"{names[differ[0]]}.")
    accelerator.print(f"Trained weights are identical on all {accelerator.num_processes} processes.")
