# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The diffusion objective both stages share: the loss with optional Min-SNR weighting, and the per-micro-batch
seed that makes noise and timesteps a function of the position in training."""

import hashlib

import torch
import torch.nn.functional as F


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
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    return (loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def sample_seeds(seed, epoch, indices):
    """One seed per sample of a batch (`indices`: the samples' indices), a function of (seed, epoch, sample) alone:
    what a stage draws per sample from it (the inpainting decoder's masks) is the same on resume and whatever the
    number of processes or the batch a sample lands in."""
    return torch.tensor([step_seed(seed, "sample", epoch, int(index)) for index in indices], dtype=torch.int64)


def step_seed(seed, rank, epoch, batch_index):
    """A seed per (process, epoch, micro-batch): the noise is a function of the position in training, so a resumed
    run draws exactly what an uninterrupted one draws, with no random state to save."""
    mixed = hashlib.sha256(f"{seed}/{rank}/{epoch}/{batch_index}".encode()).digest()
    return int.from_bytes(mixed[:8], "little") & ((1 << 63) - 1)
