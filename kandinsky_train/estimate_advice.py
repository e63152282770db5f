# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--estimate_memory's advice: the GPU's headroom, and when the figure exceeds the GPU or --memory_budget_gib, the
memory flags that would bring it under, each with its saving counted by running the estimate again with it."""

import argparse

import torch

from .errors import UserError

GiB = 2 ** 30


def levers(args):
    """(flags as typed, changes to args) of each memory lever the command does not use yet."""
    found = []
    if not args.cache_embeddings and not args.streaming:
        found.append(("--cache_embeddings", {"cache_embeddings": True}))
    if not args.gradient_checkpointing:
        found.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if args.optimizer == "adamw" and not args.use_8bit_adam:
        found.append(("--use_8bit_adam", {"use_8bit_adam": True}))
        found.append(("--optimizer adafactor", {"optimizer": "adafactor"}))
    bf16 = {} if args.mixed_precision == "bf16" else {"mixed_precision": "bf16"}
    prefix = "--mixed_precision bf16 " if bf16 else ""
    if not args.fused_backward_pass:
        found.append((prefix + "--fused_backward_pass", {"fused_backward_pass": True, **bf16}))
    if not args.full_bf16:
        found.append((prefix + "--full_bf16", {"full_bf16": True, **bf16}))
    if args.use_ema and not args.offload_ema:
        found.append(("--offload_ema", {"offload_ema": True}))
    if args.train_batch_size > 1:
        half = args.train_batch_size // 2
        found.append((f"--train_batch_size {half} --gradient_accumulation_steps "
                      f"{args.gradient_accumulation_steps * 2}",
                      {"train_batch_size": half, "gradient_accumulation_steps": args.gradient_accumulation_steps * 2}))
    return found


def accepted(args, stage):
    """Whether the scripts accept this combination (the checks that need nothing loaded)."""
    from . import checks

    try:
        checks.check_estimate_args(args, stage)
    except UserError:
        return False
    return True


def changed(args, changes):
    return argparse.Namespace(**{**vars(args), **changes})


def advise(args, figures, peak_with, stage):
    """Lines of advice; peak_with(args) counts another command's peak (bytes)."""
    from .estimate import peak_of

    peak, lines = peak_of(figures), []
    budget = args.memory_budget_gib * GiB if args.memory_budget_gib else None
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        lines.append(f"This machine's GPU: {total / GiB:.2f} GiB; headroom {(total - peak) / GiB:+.2f} GiB.")
        budget = budget or total
    if budget is None or peak <= budget:
        if budget is not None:
            lines.append(f"Fits the budget of {budget / GiB:.2f} GiB.")
        return lines
    lines.append(f"Over the budget of {budget / GiB:.2f} GiB by {(peak - budget) / GiB:.2f} GiB. Each flag alone "
                 "(counted):")
    savings = []
    for flags, changes in levers(args):
        other = changed(args, changes)
        if not accepted(other, stage):
            continue
        counted = peak_with(other)
        savings.append((peak - counted, flags, changes))
        lines.append(f"  {flags:<58} saves {(peak - counted) / GiB:6.2f} GiB -> {counted / GiB:6.2f} GiB"
                     + ("  (fits)" if counted <= budget else ""))
    # Together: the biggest savers first, until the figure fits
    combined, flags_used, counted = {}, [], peak
    for saving, flags, changes in sorted(savings, key=lambda s: -s[0]):
        if saving <= 0 or counted <= budget:
            continue
        trial = changed(args, {**combined, **changes})
        if not accepted(trial, stage):
            continue
        combined.update(changes)
        flags_used.append(flags)
        counted = peak_with(trial)
    if flags_used:
        verdict = "fits" if counted <= budget else "still over: a smaller --resolution or --use_lora"
        lines.append(f"Together: {' '.join(flags_used)} -> {counted / GiB:.2f} GiB ({verdict}).")
    return lines
