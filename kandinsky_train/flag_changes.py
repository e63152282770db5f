# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Flags whose values a checkpoint holds too: the learning rate and the optimizer's hyperparameters (in the optimizer
and schedule states), the EMA decay (in the EMA's config) and --full_bf16 (the dtype of the saved weights). Loading
a checkpoint brings its values back; the resumed run's command line is put back over them (a changed flag is what
its user asked for), said in one line before training, and recorded in the run's state, so that the model card says
which values each part of the run used."""

import glob
import logging
import os

logger = logging.getLogger(__name__)

# optimizer param-group key: the flag that sets it (Adafactor has no betas and its own eps, which no flag sets)
OPTIMIZER_FLAGS = {"initial_lr": "--learning_rate", "weight_decay": "--adam_weight_decay",
                   "betas": "--adam_beta1/--adam_beta2", "eps": "--adam_epsilon"}
# What a change does beyond the value itself, said with it.
CONSEQUENCES = {("--full_bf16", True): " (the checkpoint's fp32 weights were rounded to bf16)"}


def held_values(optimizer, ema):
    """{flag: value} that the optimizer (and the EMA) hold now."""
    group = optimizer.param_groups[0]
    values = {flag: _plain(group[key]) for key, flag in OPTIMIZER_FLAGS.items() if key in group}
    if ema is not None:
        values["--ema_decay"] = ema.decay
    return values


def weights_held(path, subfolder):
    """{"--full_bf16": whether the checkpoint's trained weights are bf16}, read from its weight files' headers (no
    tensor loads); {} when it holds no whole model to tell (a LoRA adapter)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(glob.escape(os.path.join(path, subfolder)), "*.safetensors")))
    if not files:
        return {}
    with safe_open(files[0], "pt") as f:  # bf16 weights beside fp32 buffers (the prior's clip_mean) with the flag
        return {"--full_bf16": any(f.get_slice(key).get_dtype() == "BF16" for key in f.keys())}


def reapply(asked, optimizer, lr_scheduler, ema, state, held=None):
    """After a checkpoint has loaded: the values `asked` (held_values before it loaded, and --full_bf16) replace the
    checkpoint's where they differ; the schedule recomputes the learning rate from its base
    (runtime.set_schedule_position). held: weights_held of the checkpoint, read before it loaded (the loaded weights
    take the model's dtype, so the change is said, and was applied by the load itself)."""
    found = {**held_values(optimizer, ema), **(held or {})}
    changed = {flag: (found[flag], value) for flag, value in asked.items() if found.get(flag, value) != value}
    if not changed:
        return
    keys = {flag: key for key, flag in OPTIMIZER_FLAGS.items()}
    for flag, (_, value) in changed.items():
        if flag == "--full_bf16":
            continue
        if flag == "--ema_decay":
            ema.decay = value
            continue
        for group in optimizer.param_groups:
            group[keys[flag]] = tuple(value) if isinstance(value, list) else value
    if "--learning_rate" in changed:
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # below accelerate's wrapper
        scheduler.base_lrs = [changed["--learning_rate"][1]] * len(scheduler.base_lrs)
    state.changes += [[state.global_step, flag, old, new] for flag, (old, new) in changed.items()]
    logger.warning(f"Changed since the checkpoint, applied from step {state.global_step + 1} on (the model card "
                   "notes the earlier values): " + "; ".join(f"{flag} {_shown(old)} -> {_shown(new)}"
                                                              f"{CONSEQUENCES.get((flag, new), '')}"
                                                              for flag, (old, new) in changed.items()))


def _plain(value):
    """JSON's form of a value (betas are a tuple in the optimizer, a list once recorded; torchao keeps the learning
    rate in a tensor)."""
    if getattr(value, "ndim", None) == 0:
        return value.item()
    return list(value) if isinstance(value, tuple) else value


def _shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def earlier(changes, flag):
    """The model card's note on a flag's earlier values, e.g. " (0.0001 until step 4)"; "" if it never changed."""
    notes = [f"{_shown(old)} until step {step}" for step, name, old, _ in changes if name == flag]
    return f" ({'; '.join(notes)})" if notes else ""
