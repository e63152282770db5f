# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: OUTPUT_DIR/checkpoint-STEP holds what accelerate saves (optimizer, schedule, RNG states), the
trained model in diffusers format (SUBFOLDER/, SUBFOLDER_ema/ or SUBFOLDER_lora/, the reference scripts' layout),
and training_state.json: where the run is, written last (a folder of ours without it is a save cut short; one with
it is complete while it still holds every file checkpoint_folders.Layout.missing looks for).
A checkpoint of diffusers' reference scripts (the same, without training_state.json) resumes at the step its name
gives (checkpoint_folders.py says which folders are complete; model_state.py writes and reads the model folders).

A checkpoint is written into .tmp-checkpoint-STEP, after a check that the disk has room for it, and renamed when
complete; old ones are rotated away only after. A folder named checkpoint-STEP that is not complete is never
overwritten or deleted."""

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field

from . import faults, storage
from .checkpoint_folders import STATE_FILE, is_reference, list_checkpoints, read_state, step_of
from .errors import fail

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run is, beside what accelerate saves: one object, saved and restored whole."""

    seed: int
    steps_per_epoch: int  # None with --streaming: a stream has no length
    stage: str = None  # "prior" or "decoder": the other stage never resumes this checkpoint (checks.py)
    decoder_type: str = None  # the decoder's (decoders.DECODER_TYPES): another decoder never resumes it
    global_step: int = 0
    epoch: int = 0
    skipped_images: list = field(default_factory=list)
    held_out: str = None  # the rows --validation_split took out of training (holdout.split_rows)
    # The run's own figures for its model card, summed over resumed sessions from step counted_from_step on.
    samples_seen: int = 0
    train_seconds: float = 0.0
    counted_from_step: int = 0
    stream: dict = None  # --streaming: where each process and worker is in the epoch (streaming.StreamBatches)
    # Steps not counted in this batch geometry's epochs: resumed with another (processes, batch size, accumulation),
    # the run takes up the epoch where the checkpoint's geometry had it (carried_offset).
    step_offset: int = 0
    validation_due: list = field(default_factory=list)  # what a stop at this step left undone: "images", "evaluate"
    changes: list = field(default_factory=list)  # [step, flag, checkpoint's value, new value] of each resume

    def state_dict(self):
        return asdict(self)

    @property
    def epoch_steps(self):
        """Optimizer steps counted in epochs of this run's geometry (the epoch is epoch_steps // steps_per_epoch)."""
        return self.global_step - self.step_offset

    def load_state_dict(self, recorded):
        if recorded.get("held_out") != self.held_out:
            fail(f"The held-out split differs from the checkpoint's (checkpoint: {recorded.get('held_out') or 'none'}"
                 f"; now: {self.held_out or 'none'}): the run would train on rows it held out, or hold out rows it "
                 "trained on. Resume with the same --validation_split and data, or start a new run in another "
                 "--output_dir.")
        if recorded.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            logger.warning("The data or batch settings changed since the checkpoint; the resumed data order "
                           "will not match an uninterrupted run.")
        self.global_step = recorded["global_step"]
        if self.steps_per_epoch is None:  # a stream: its recorded position says which epoch
            self.stream = recorded.get("stream")
            self.epoch = self.stream["epoch"] if self.stream else 0
        else:
            self.step_offset = carried_offset(recorded, self.steps_per_epoch)
            self.epoch = self.epoch_steps // self.steps_per_epoch  # the epoch the next step belongs to
        self.validation_due = recorded.get("validation_due", [])
        self.changes = recorded.get("changes", [])
        self.samples_seen = recorded.get("samples_seen", 0)
        self.train_seconds = recorded.get("train_seconds", 0.0)
        # A checkpoint that did not record them (a reference script's): the figures count from its step on.
        self.counted_from_step = recorded.get("counted_from_step", self.global_step)


def carried_offset(recorded, steps_per_epoch):
    """The step offset of a run that resumes a checkpoint (its recorded state) with `steps_per_epoch` steps an epoch:
    with another number than the checkpoint's, the epoch and the share of it done are carried over, not the step
    count (on twice the processes, 4 steps of 4 an epoch are one epoch done, not two of 2)."""
    offset, before = recorded.get("step_offset", 0), recorded.get("steps_per_epoch")
    if before in (None, steps_per_epoch):
        return offset
    epoch, into = divmod(recorded["global_step"] - offset, before)
    return recorded["global_step"] - (epoch * steps_per_epoch + into * steps_per_epoch // before)


def step_offset(resume_path, steps_per_epoch):
    """carried_offset of the checkpoint a run resumes (0 for a new run or a reference script's checkpoint); known
    before the state loads, for the run's length and schedule."""
    if resume_path is None or is_reference(resume_path) or steps_per_epoch is None:
        return 0
    return carried_offset(read_state(resume_path), steps_per_epoch)


def set_aside_newer(accelerator, output_dir, step, layout):
    """Resuming from an older checkpoint abandons the newer ones. Move them into OUTPUT_DIR/abandoned-after-
    checkpoint-STEP (never deleted), so that rotation and `latest` only see the run that goes on."""
    if accelerator.is_main_process:
        newer = [path for s, path in list_checkpoints(output_dir, layout) if s > step]
        if newer:
            aside = os.path.join(output_dir, f"abandoned-after-checkpoint-{step}")
            number = 2
            while os.path.exists(aside):  # resumed from the same step before
                aside = os.path.join(output_dir, f"abandoned-after-checkpoint-{step}-{number}")
                number += 1
            os.makedirs(aside)
            for path in newer:
                os.replace(path, os.path.join(aside, os.path.basename(path)))
            names = ", ".join(os.path.basename(path) for path in newer)
            logger.warning(f"Resuming from checkpoint-{step} abandons the newer {names}: moved to {aside}.")
    accelerator.wait_for_everyone()


def resolve_seed(args, resume_path):
    """The run's base seed: the flag, else the one recorded in the checkpoint, else a fresh one drawn by the main
    process (every process must shuffle the data alike for the shards not to overlap)."""
    from accelerate.utils import broadcast_object_list

    recorded = None
    if resume_path is not None and not is_reference(resume_path):
        recorded = read_state(resume_path).get("seed")
    if args.seed is not None and recorded is not None and recorded != args.seed:
        logger.warning(f"--seed {args.seed} differs from the checkpoint's seed {recorded}; using {args.seed}.")
    if args.seed is not None or recorded is not None:
        return args.seed if args.seed is not None else recorded
    seed = broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]
    if resume_path is not None:
        logger.warning(f"{resume_path} records no seed (diffusers' reference scripts do not): the resumed run uses "
                       f"seed {seed}; give --seed {seed} to repeat it.")
    return seed


def restore(accelerator, path, state):
    """Load what accelerate saved (and, through the hooks, the model and its EMA), then the run's position."""
    accelerator.print(f"Resuming from {path}")
    accelerator.load_state(path)
    if not is_reference(path):
        state.load_state_dict(read_state(path))
        return
    state.load_state_dict({"global_step": step_of(path)})
    if state.steps_per_epoch is None:
        logger.warning(f"{os.path.basename(path)} has no {STATE_FILE} (diffusers' reference scripts write none): "
                       f"the run goes on at step {state.global_step}, taken from the folder's name, and reads the "
                       "stream from its start.")
        return
    done = state.global_step - state.epoch * state.steps_per_epoch
    logger.warning(
        f"{os.path.basename(path)} has no {STATE_FILE} (diffusers' reference scripts write none): what it holds "
        f"(weights, EMA, optimizer, learning-rate schedule, random states) is loaded, and the run goes on at step "
        f"{state.global_step}, taken from the folder's name. Where it was in the data was not recorded: this run "
        f"takes up epoch {state.epoch} in its own data order (seed {state.seed}) after the batches of the first "
        f"{done} of its {state.steps_per_epoch} steps, so the rest of that epoch is as much data as was left, but "
        "not exactly the images not seen yet; later epochs are unaffected.")


def size_estimate(model, trained, ema=None, lora=False, optimizer="adamw", use_8bit_adam=False):
    """The size of a first checkpoint, before one exists to measure, as it is written: the model at its weights'
    dtypes (its adapters with LoRA), the EMA (fp32, also with --full_bf16), and the optimizer's states at their own
    precision (AdamW's fp32 moments, also for bf16 weights; 8-bit and 4-bit ones at their size)."""
    from .optimizers import state_bytes

    model_bytes = storage.tensor_bytes(trained if lora else model.parameters())
    ema_bytes = storage.tensor_bytes(ema.shadow_params) if ema is not None else 0
    return model_bytes + ema_bytes + state_bytes(optimizer, [p.shape for p in trained], use_8bit_adam)


def save(accelerator, output_dir, state, total_limit, before_remove=None, *, layout, expected_bytes=0):
    """Write checkpoint-STEP atomically: into a temporary folder, renamed when complete; rotate after. Stops with one
    line, earlier checkpoints untouched, when the disk has less room than the newest checkpoint takes
    (`expected_bytes` before there is one) or fills up during the write.
    before_remove(path) runs before an old checkpoint is deleted (to let its background upload finish)."""
    name = f"checkpoint-{state.global_step}"
    final, temp = os.path.join(output_dir, name), os.path.join(output_dir, f".tmp-{name}")
    previous = list_checkpoints(output_dir, layout)
    needed = storage.tree_bytes(previous[-1][1]) if previous else expected_bytes
    basis = f"the size of {os.path.basename(previous[-1][1])}" if previous else "estimated from the model's weights"
    kept = f"{os.path.basename(previous[-1][1])} and the checkpoints before it are" if previous else "The output is"
    advice = (f"{kept} intact. Free some space (with --checkpoints_total_limit the oldest checkpoint is removed only "
              "after the new one is complete) and continue with --resume_from_checkpoint latest.")
    if accelerator.is_main_process:
        for leftover in os.listdir(output_dir):  # saves that were killed: never resumed, and they take room
            if leftover.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, leftover), ignore_errors=True)
    with storage.writing(name, output_dir, needed, partial=temp, advice=advice, basis=basis,
                         free=_main_process_free(accelerator, output_dir)):
        accelerator.wait_for_everyone()
        accelerator.save_state(temp)
        faults.at(f"save:{state.global_step}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(temp, STATE_FILE), "w") as f:
                json.dump(state.state_dict(), f, indent=2)
    if accelerator.is_main_process:
        _clear_the_way(final, layout)
        os.replace(temp, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir, layout)[:-total_limit]:
                if before_remove is not None:
                    before_remove(old)
                logger.info(f"Removing old checkpoint {old}")
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _main_process_free(accelerator, folder):
    """The free space the main process sees, on every process: they must agree whether to write."""
    free = storage.free_bytes(folder) if accelerator.is_main_process else None
    if accelerator.num_processes == 1:
        return free
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([free])[0]


def _clear_the_way(final, layout):
    """A folder already named like the new checkpoint: a complete one is from an earlier, abandoned run and is
    replaced; one that is not complete is nobody's checkpoint to delete, and is set aside under a new name."""
    if not os.path.isdir(final):
        return
    if not layout.missing(final):
        shutil.rmtree(final)
        return
    number, aside = 1, os.path.join(os.path.dirname(final), f"incomplete-{os.path.basename(final)}")
    while os.path.exists(aside):
        number += 1
        aside = os.path.join(os.path.dirname(final), f"incomplete-{os.path.basename(final)}-{number}")
    os.replace(final, aside)
    logger.warning(f"{final} is not a complete checkpoint; it was set aside as {aside} before writing a new one.")
