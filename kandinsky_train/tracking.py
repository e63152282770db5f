# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What goes to TensorBoard / Weights & Biases: the run's configuration, each optimizer step's figures (read one
step late, so that logging never makes the host wait for the GPU), and validation images."""

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .runtime import count_parameters


def start(accelerator, args):
    """Open the trackers with every argument as the run's configuration (never the Hub token)."""
    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
                  if k != "hub_token"}
        accelerator.init_trackers(args.tracker_project_name, config=config)


class StepMeter:
    """The figures of one optimizer step: mean loss over its micro-batches and processes, samples/s, gradient norm,
    peak memory. Losses are summed on the device; nothing here waits for the GPU."""

    def __init__(self, accelerator, batch_size):
        self.accelerator, self.batch_size = accelerator, batch_size
        self._reset()

    def _reset(self):
        self.loss = torch.zeros((), device=self.accelerator.device)
        self.micro_batches = 0
        self.start = time.perf_counter()

    def add(self, loss):
        self.loss += loss.detach()
        self.micro_batches += 1

    def figures(self, lr, grad_norm):
        elapsed = time.perf_counter() - self.start
        samples = self.micro_batches * self.batch_size * self.accelerator.num_processes
        values = {"train_loss": self.accelerator.reduce(self.loss / self.micro_batches, "mean"), "lr": lr,
                  "samples_per_second": samples / max(elapsed, 1e-9)}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm
        if self.accelerator.device.type == "cuda":
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        self._reset()
        return values


class LaggedLogger:
    """Log a step's figures when the next step ends, so reading them never stalls the GPU pipeline."""

    def __init__(self, accelerator, progress):
        self.accelerator, self.progress, self.pending = accelerator, progress, None
        self.losses = deque(maxlen=10)  # the last steps' losses, for the model card
        self.diverged = None  # (step, loss) of the first step whose loss was not finite (the same on every process)

    def recent_loss(self):
        """The mean training loss of the last (up to 10) logged steps (None when none were), and how many."""
        return (sum(self.losses) / len(self.losses) if self.losses else None), len(self.losses)

    def push(self, step, values):
        self.flush()
        self.pending = (step, values)

    def flush(self):
        if self.pending is None:
            return
        step, values = self.pending
        self.pending = None
        logs = {k: (v.item() if torch.is_tensor(v) else v) for k, v in values.items()}
        self.losses.append(logs["train_loss"])
        if self.diverged is None and not math.isfinite(logs["train_loss"]):
            self.diverged = (step, logs["train_loss"])
        self.progress.set_postfix(loss=f"{logs['train_loss']:.4g}", lr=f"{logs['lr']:.3g}", refresh=False)
        self.accelerator.log(logs, step=step)


@dataclass
class RunSummary:
    """What the run did, for its model card: its own figures, not the command line's."""

    steps: int  # optimizer steps, resumed sessions included
    epochs: float | None  # passes over the data those steps make (None: a stream whose length is not known yet)
    samples: int  # samples trained on (all processes), from step counted_from_step on
    seconds: float  # time in the training loop, from step counted_from_step on
    counted_from_step: int  # 0, or the step of a checkpoint that did not record them (a reference script's)
    final_loss: float | None  # mean training loss of the last loss_steps steps (None: no step in the last session)
    loss_steps: int
    processes: int
    device: str
    precision: str
    changes: list = field(default_factory=list)  # flags changed on resume (checkpoint.TrainState.changes)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return {"cpu": "CPU", "mps": "Apple GPU (MPS)"}.get(device.type, device.type)


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


def print_plan(accelerator, args, stage_name, data, max_steps, model, cached, seed, evaluation=None):
    """The run's first line: what it trains, on what, for how long, in which batches and precision."""
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    accelerator.print(
        f"***** Training the {stage_name}: {data}, {max_steps} optimizer steps, batch {args.train_batch_size} per "
        f"device x {accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation = "
        f"{total_batch}, {count_parameters(accelerator.unwrap_model(model)):,} trainable parameters, precision "
        f"{accelerator.mixed_precision}, frozen outputs {'cached' if cached else 'computed every step'}, seed {seed} "
        "*****")
    if evaluation is not None:
        accelerator.print(f"Evaluating a {evaluation.summary()}, every "
                          + (f"{args.validation_steps} steps" if args.validation_steps else "epoch"))


def read_scalars(log_dir):
    """{tag: {step: (wall_time, value)}} from every TensorBoard event file under log_dir (for the benchmark, the
    demo's report and the tests, which read a run's figures back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: (e.wall_time, e.value) for e in events.Scalars(tag)})
    return scalars


def wandb_run_url(accelerator):
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return getattr(tracker.run, "url", None)
    return None
