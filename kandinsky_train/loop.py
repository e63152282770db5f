# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The Accelerate training loop both stages share. `Trainer.train()` is the table of contents: restore, then for
each micro-batch a train step and, at each optimizer step, EMA, figures, checkpoint and stop; validation images and
the held-out evaluation when due (every --validation_steps steps, or at the end of an epoch); then finish."""

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from . import checkpoint, checkpoint_folders, faults, flag_changes, model_state, tracking
from .cache import frozen_outputs
from .batches import cap_batch_size, make_batches
from .data import TrainingSamples, training_samples
from .diffusion import sample_seeds, step_seed
from .errors import fail
from .ema import ema_device, ema_step, make_ema
from .evaluation import HeldOutEvaluation
from .hub import CheckpointUploads
from .memory import OptimizerUpdate, set_weight_dtypes
from .preemption import StopRequest, finishing
from .runtime import (check_ranks_agree, compile_model, console_through_progress_bars, make_lr_scheduler,
                      make_optimizer, set_schedule_position, weight_dtype_of)
from .streaming import StreamBatches, StreamSamples
from .validation import Validations


@dataclass
class TrainResult:
    """What the script's final save needs: the trained model (unwrapped), its EMA or None, the final validation
    images, and the run's own figures for the model card."""

    model: torch.nn.Module
    ema: object
    images: list
    summary: tracking.RunSummary


def train(args, accelerator, stage, dataset, report, hub_repo_id=None, held_out=None):
    """Train the stage's model on the dataset (evaluating it on held_out, a holdout.HeldOut, if given); a TrainResult
    for the script's final save."""
    if not args.streaming:  # a stream's length is not known
        cap_batch_size(args, accelerator, len(dataset))
    with console_through_progress_bars():
        return Trainer(args, accelerator, stage, dataset, report, hub_repo_id, held_out).train()


class Trainer:
    def __init__(self, args, accelerator, stage, dataset, report, hub_repo_id, held_out=None):
        self.args, self.accelerator, self.stage, self.report = args, accelerator, stage, report
        device = self.device = accelerator.device
        if accelerator.is_main_process:  # only now: a run refused before this point leaves nothing behind
            os.makedirs(args.output_dir, exist_ok=True)
        self.layout = checkpoint_folders.Layout.of(args, stage.name)
        self.resume_path = checkpoint_folders.resolve_resume(args, self.layout)
        seed = checkpoint.resolve_seed(args, self.resume_path)
        accelerator.dataloader_config.data_seed = seed  # read when the data loader is prepared

        self.samples, held_out_samples, self.encode = self.frozen_outputs(dataset, held_out, seed)
        self.evaluation = None
        if held_out is not None:
            self.evaluation = HeldOutEvaluation(args, accelerator, stage, held_out_samples, self.encode)
        self.schedule_offset = 0
        if args.streaming:  # no length: --max_train_steps is required, --num_train_epochs counts passes
            self.batches = StreamBatches(args, accelerator, self.samples)
            steps_per_epoch, self.max_steps, self.num_epochs = None, args.max_train_steps, args.num_train_epochs
        else:
            self.batches = make_batches(args, accelerator, self.samples)
            steps_per_epoch = math.ceil(len(self.batches) / args.gradient_accumulation_steps)
            offset = checkpoint.step_offset(self.resume_path, steps_per_epoch)  # another geometry before
            self.max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch + offset
            self.num_epochs = math.ceil((self.max_steps - offset) / steps_per_epoch)
            # A length in epochs is a schedule over epochs: it goes on at the share of them done.
            self.schedule_offset = 0 if args.max_train_steps else offset
        self.state = checkpoint.TrainState(seed=seed, steps_per_epoch=steps_per_epoch, stage=stage.name,
                                           decoder_type=stage.decoder_type,
                                           skipped_images=report.skipped, held_out=held_out and held_out.split)

        self.params = [p for p in stage.model.parameters() if p.requires_grad]
        set_weight_dtypes(args, stage.model, self.params, weight_dtype_of(accelerator))
        optimizer = make_optimizer(args, self.params, device)
        model_state.accept_whole_model_optimizer_states(optimizer, stage.model)
        lr_scheduler = make_lr_scheduler(args, optimizer, self.max_steps - self.schedule_offset,
                                         accelerator.num_processes)
        self.ema = make_ema(args, stage.model, device)
        self.checkpoint_estimate = checkpoint.size_estimate(stage.model, self.params, self.ema, args.use_lora,
                                                            args.optimizer, args.use_8bit_adam)
        model_state.ModelStateHooks(accelerator, stage, self.ema, lora=args.use_lora,
                                   ema_device=ema_device(args, device)).register()
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(stage.model, optimizer, lr_scheduler)
        self.update = OptimizerUpdate(args, accelerator, self.optimizer, self.params, self.state)
        if args.torch_compile:
            self.model = compile_model(self.model, regional=args.fused_backward_pass)
        self.uploads = CheckpointUploads(args, hub_repo_id, stage.subfolder)
        self.generator = torch.Generator(device=device)
        self.validations = Validations(args, accelerator, stage, self.model, self.ema, self.evaluation, self.state,
                                       self.max_steps)
        self.grad_norm = None
        self.clock = time.monotonic()

    def frozen_outputs(self, dataset, held_out, seed):
        """The training samples and the held-out ones (or None) as the loop reads them, and the encoder to run on
        each batch (None when --cache_embeddings has computed its outputs). Held-out samples come in their first
        version, at --resolution: the same figures at every evaluation."""
        if self.args.streaming:  # nothing to cache (checks.py refuses --cache_embeddings)
            sets = [(StreamSamples(dataset, self.args, self.stage, seed), None)]
        else:
            sets = [(training_samples(dataset, self.args.image_column, self.stage, seed), dataset._fingerprint)]
        if held_out is not None:
            sets.append((TrainingSamples(held_out.dataset, self.args.image_column, self.stage.make_sample,
                                         self.stage.columns), held_out.dataset._fingerprint))
        outputs, encode = frozen_outputs(self.args, self.accelerator, self.stage, sets)
        return outputs[0], (outputs[1] if held_out is not None else None), encode

    # ---------------------------------------------------------------------------------------------------------
    def train(self):
        from tqdm.auto import tqdm

        self.restore()
        tracking.start(self.accelerator, self.args)
        self.print_plan()
        self.stop = StopRequest()
        self.progress = tqdm(range(self.max_steps), initial=self.state.global_step, desc="Steps",
                             disable=not self.accelerator.is_local_main_process)
        self.meter = tracking.StepMeter(self.accelerator, self.args.train_batch_size)
        self.logger = tracking.LaggedLogger(self.accelerator, self.progress)
        self.validations.at_start()
        for epoch in range(self.state.epoch, self.num_epochs):
            if self.done:
                break
            for batch_index, batch in self.epoch_batches(epoch):
                if self.train_step(batch, epoch, batch_index):
                    self.end_optimizer_step()
                    self.validations.when_due()
                if self.done:
                    break
            self.validations.when_due(end_of_epoch=epoch)
        return self.finish()

    def restore(self):
        """Continue from the checkpoint, if any: the state is loaded, the schedule is put at the checkpoint's
        optimizer step, and then (once nothing can refuse the resume any more) its newer siblings, an abandoned
        future, are set aside."""
        if self.resume_path is None:
            return
        # the command line's, before the checkpoint's
        asked = {**flag_changes.held_values(self.optimizer, self.ema), "--full_bf16": self.args.full_bf16}
        held = flag_changes.weights_held(self.resume_path, self.stage.subfolder)
        checkpoint.restore(self.accelerator, self.resume_path, self.state)
        flag_changes.reapply(asked, self.optimizer, self.lr_scheduler, self.ema, self.state, held)
        self.batches.restore(self.state.stream)
        set_schedule_position(self.lr_scheduler, self.state.global_step - self.schedule_offset,
                              self.accelerator.num_processes)
        step = checkpoint_folders.step_of(self.resume_path)
        checkpoint.set_aside_newer(self.accelerator, self.args.output_dir, step, self.layout)

    @property
    def done(self):
        return self.state.global_step >= self.max_steps

    def epoch_batches(self, epoch):
        """(micro-batch index, batch) of one epoch; a resumed epoch skips what the checkpoint had consumed."""
        self.state.epoch = epoch
        self.model.train()
        start, steps, per_epoch = 0, self.state.epoch_steps, self.state.steps_per_epoch
        if per_epoch and epoch == steps // per_epoch:
            start = (steps % per_epoch) * self.args.gradient_accumulation_steps
        batches = self.batches.epoch(epoch, start)
        return faults.observed(batches, self.accelerator.process_index, epoch, self.batches.first_micro(epoch))

    def train_step(self, batch, epoch, batch_index):
        """Forward and backward one micro-batch; the optimizer steps at the last one of each accumulation. Returns
        whether it did."""
        accelerator = self.accelerator
        self.generator.manual_seed(step_seed(self.state.seed, accelerator.process_index, epoch, batch_index))
        with accelerator.accumulate(self.model):
            indices = batch.pop("index")
            self.state.samples_seen += len(indices) * accelerator.num_processes
            if self.encode is not None:
                with torch.no_grad():
                    # contiguous, as cached tensors are: the layout decides which kernels run
                    batch = {k: v.contiguous() for k, v in self.encode(batch).items()}
            if self.stage.draws_per_sample:
                batch["sample_seed"] = sample_seeds(self.state.seed, epoch, indices)
            loss = self.stage.loss(self.model, batch, self.generator)
            accelerator.backward(loss)  # with --fused_backward_pass, the weights are stepped in here
            if accelerator.sync_gradients:
                self.grad_norm = self.update.step()
            self.lr_scheduler.step()
        self.meter.add(loss)
        return accelerator.sync_gradients

    def end_optimizer_step(self):
        """EMA, the step's figures, and a checkpoint when one is due or a stop was asked for."""
        self.state.global_step += 1
        if self.ema is not None:
            ema_step(self.ema, self.accelerator.unwrap_model(self.model), self.args, self.device)
        self.logger.push(self.state.global_step, self.meter.figures(self.lr_scheduler.get_last_lr()[0],
                                                                    self.grad_norm))
        self.stop_if_diverged()
        self.grad_norm = None
        self.progress.update(1)
        stopping = self.stop.requested(self.accelerator)
        if stopping:  # what this step still owes falls to the resumed run
            self.state.validation_due = self.validations.due_at_stop()
        if stopping or self.state.global_step % self.args.checkpointing_steps == 0:
            self.save_checkpoint()
        if stopping:
            self.exit_on_signal()

    def save_checkpoint(self):
        self.logger.flush()  # this step's loss, read now: a diverged step is never saved
        self.stop_if_diverged(weights=True)
        self.count_time()
        self.state.stream = self.batches.position()
        path = checkpoint.save(self.accelerator, self.args.output_dir, self.state, self.args.checkpoints_total_limit,
                               before_remove=self.uploads.wait, layout=self.layout,
                               expected_bytes=self.checkpoint_estimate)
        self.accelerator.print(f"Saved {path}")
        self.uploads.push(path)

    def exit_on_signal(self):
        self.logger.flush()
        self.accelerator.print(f"Received {signal.Signals(self.stop.signal).name}: saved checkpoint-"
                               f"{self.state.global_step} and stopped. Continue with --resume_from_checkpoint latest")
        self.uploads.wait()
        self.accelerator.end_training()
        sys.exit(self.stop.exit_code())

    def stop_if_diverged(self, weights=False):
        """Stop, with the checkpoints saved so far, at the first non-finite training loss (read one step late, as
        it is logged) or, before a save (`weights`), at a non-finite trained weight: a diverged model is never saved
        as a checkpoint or as the fine-tuned model. Every process sees the same loss and weights, and stops alike."""
        found = self.logger.diverged
        if found is None and weights and not torch.stack([p.isfinite().all() for p in self.params]).all():
            found = (self.state.global_step, "finite but a trained weight was not")
        if found is None:
            return
        saved = checkpoint_folders.list_checkpoints(self.args.output_dir, self.layout)
        last = os.path.basename(saved[-1][1]) if saved else None
        self.progress.close()
        self.uploads.wait()
        self.accelerator.end_training()
        fail(f"Training diverged: the training loss was {found[1]} at step {found[0]}. Nothing from that step on was "
             "saved. " + (f"The last good checkpoint is {last}: resume from it (--resume_from_checkpoint {last}) "
                          if last else "No checkpoint was saved before it: start again ")
             + "with a lower --learning_rate (with --mixed_precision fp16, bf16 or a lower --max_grad_norm can help).")

    def finish(self):
        saved = checkpoint_folders.list_checkpoints(self.args.output_dir, self.layout)
        self.stop.training_ended(f"Training reached step {self.state.global_step}; the last checkpoint is "
                                 f"{os.path.basename(saved[-1][1]) if saved else 'none'}.")
        self.logger.flush()
        self.progress.close()
        self.stop_if_diverged(weights=True)
        check_ranks_agree(self.accelerator, self.model)
        finishing("the final validation")
        faults.at("finish")
        final_images = self.validations.at_finish()
        self.report_skipped()
        finishing("the checkpoint uploads")
        self.uploads.wait()
        self.count_time()
        return TrainResult(self.accelerator.unwrap_model(self.model), self.ema, final_images, self.summary())

    def report_skipped(self):
        if self.args.streaming:
            skipped = self.batches.skipped_total()  # a collective: every process counts its own
            if skipped:
                self.accelerator.print(f"Data: {skipped} sample(s) skipped (unreadable image or missing caption), "
                                       "each named in the log")
        elif self.report.skipped:
            self.accelerator.print(f"Data: {self.report.summary()}")

    def count_time(self):
        """Add the time since the last count to the run's training time (recorded with each checkpoint)."""
        now = time.monotonic()
        self.state.train_seconds += now - self.clock
        self.clock = now

    def summary(self):
        state, accelerator = self.state, self.accelerator
        final_loss, loss_steps = self.logger.recent_loss()
        return tracking.RunSummary(
            steps=state.global_step, samples=state.samples_seen,
            epochs=state.epoch_steps / state.steps_per_epoch if state.steps_per_epoch else self.batches.passes(),
            seconds=state.train_seconds, counted_from_step=state.counted_from_step, final_loss=final_loss,
            loss_steps=loss_steps, processes=accelerator.num_processes,
            device=tracking.device_name(accelerator.device), precision=accelerator.mixed_precision,
            changes=state.changes)

    def print_plan(self):
        args = self.args
        data = (f"a stream of examples (buffer {args.shuffle_buffer_size}, bad ones skipped as they come), up to "
                f"{self.num_epochs} passes" if args.streaming else
                f"{len(self.samples)} examples ({self.report.summary()}), {self.num_epochs} epochs")
        tracking.print_plan(self.accelerator, args, self.stage.name, data, self.max_steps, self.model,
                            cached=self.encode is None, seed=self.state.seed, evaluation=self.evaluation)
