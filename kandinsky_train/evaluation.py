# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Held-out evaluation: the stage's loss on samples it never trains on (eval_loss), at fixed timesteps and with
noise fixed per sample, so that two evaluations of the same weights give the same number and the curve moves with
the weights alone; for the prior also the cosine between the image embedding a short denoising predicts from the
caption and the true one (eval_cosine). Every process evaluates its share; the sums are reduced across processes."""

import contextlib
import hashlib
import time

import torch
import torch.nn.functional as F

from .data import collate
from .diffusion import sample_seeds
from .ema import ema_weights

NUM_TIMESTEPS = 4  # per sample: the loss depends on the timestep far more than on the sample


def fixed_timesteps(num_train_timesteps, count=NUM_TIMESTEPS):
    """`count` timesteps evenly spread over the schedule: the middle of each of `count` equal ranges."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def sample_generator(index):
    """A CPU generator seeded by the sample's index alone: the same noise whatever the batch, process or device."""
    digest = hashlib.sha256(f"held-out/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def fixed_noise(generators, shape):
    """One draw of `shape` per sample, from the sample's own generator."""
    return torch.stack([torch.randn(shape, generator=generator) for generator in generators])


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class HeldOutEvaluation:
    """eval_loss (and eval_cosine) of the held-out samples, through the stage's HeldOutHooks."""

    def __init__(self, args, accelerator, stage, samples, encode):
        self.accelerator, self.hooks, self.encode = accelerator, stage.held_out, encode
        self.draws_per_sample = stage.draws_per_sample
        rank, world = accelerator.process_index, accelerator.num_processes
        share = torch.utils.data.Subset(samples, range(rank, len(samples), world))
        self.loader = torch.utils.data.DataLoader(share, batch_size=args.train_batch_size, collate_fn=collate)
        self.timesteps = fixed_timesteps(self.hooks.num_train_timesteps)
        self.num_samples = len(samples)
        self.timed = False

    def summary(self):
        return (f"held-out set of {self.num_samples} samples: eval_loss at timesteps {self.timesteps}"
                + (", eval_cosine" if self.hooks.cosine is not None else ""))

    def run(self, model, ema, step):
        """Evaluate the weights validation shows (the EMA's with --use_ema) and log the figures at `step`; every
        process must call it, and all return the same figures."""
        start = time.perf_counter()
        with ema_weights(ema, model) as shown, evaluating(shown), torch.no_grad(), self.accelerator.autocast():
            sums = self.totals(shown)
        sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        figures = {"eval_loss": (sums[0] / sums[1]).item()}
        if self.hooks.cosine is not None:
            figures["eval_cosine"] = (sums[2] / sums[3]).item()
        self.accelerator.log(figures, step=step)
        line = ", ".join(f"{name} {value:.6g}" for name, value in figures.items())
        if not self.timed:  # the cost once: it decides how often a run can afford to evaluate
            line += f" ({int(sums[3])} samples, {time.perf_counter() - start:.1f} s per evaluation)"
            self.timed = True
        self.accelerator.print(f"Held-out evaluation at step {step}: {line}")
        return figures

    def totals(self, model):
        """This process's sums, float64 on the CPU: (loss, loss terms, cosine, samples)."""
        device, hooks = self.accelerator.device, self.hooks
        sums = torch.zeros(4, dtype=torch.float64)
        for batch in self.loader:
            indices = batch.pop("index")
            generators = [sample_generator(i) for i in indices.tolist()]
            features = self.encode(batch) if self.encode is not None else batch
            if self.draws_per_sample:
                features["sample_seed"] = sample_seeds(0, 0, indices)  # the same draws at every evaluation
            features = {key: value.to(device) for key, value in features.items()}
            noised = features[hooks.noised]
            noise = fixed_noise(generators, noised.shape[1:]).to(device, noised.dtype)
            for t in self.timesteps:
                timesteps = torch.full((len(generators),), t, device=device, dtype=torch.long)
                prediction, target = hooks.predict(model, features, noise, timesteps)
                loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
                sums[0] += loss.mean(dim=list(range(1, loss.ndim))).sum().item()
            sums[1] += len(generators) * len(self.timesteps)
            if hooks.cosine is not None:
                sums[2] += hooks.cosine(model, features, generators).double().sum().item()
            sums[3] += len(generators)
        return sums
