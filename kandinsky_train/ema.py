# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--use_ema: diffusers' EMAModel, kept on the device or (--offload_ema) in pinned CPU memory between updates, and
swapped into the model for validation."""

import contextlib


def make_ema(args, model, device):
    """The EMA of the trained model's weights, or None without --use_ema."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    # The average in fp32 whatever the weights' dtype: a bf16 one (--full_bf16) would round most updates away.
    ema = EMAModel([p.detach().float() for p in model.parameters()], decay=args.ema_decay, model_cls=type(model),
                   model_config=model.config, foreach=args.foreach_ema)
    if not args.offload_ema:
        ema.to(device)
    elif device.type == "cuda":
        ema.pin_memory()  # faster copies to and from the GPU at each update
    return ema


def ema_device(args, device):
    """Where the EMA weights live between updates."""
    return "cpu" if args.offload_ema else device


def ema_step(ema, model, args, device):
    if args.offload_ema:
        # Non-blocking both ways is safe: the copies stay in stream order with the update between them.
        ema.to(device, non_blocking=True)
    ema.step(model.parameters())
    if args.offload_ema:
        ema.to("cpu", non_blocking=True)


@contextlib.contextmanager
def ema_weights(ema, model):
    """The model with the EMA weights in place (the model as is without EMA); the trained weights come back after."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())
