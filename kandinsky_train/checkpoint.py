# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: OUTPUT_DIR/checkpoint-STEP holds what accelerate saves (optimizer, schedule, RNG states), the
trained model in diffusers format (SUBFOLDER/, SUBFOLDER_ema/ or SUBFOLDER_lora/, the reference scripts' layout),
and training_state.json: where the run is, written last, so that its presence marks the checkpoint complete.

A checkpoint is written into .tmp-checkpoint-STEP and renamed when complete; old ones are rotated away only after."""

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

from . import faults
from .errors import fail

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


@dataclass
class TrainState:
    """Where a run is, beside what accelerate saves: one object, saved and restored whole."""

    seed: int
    steps_per_epoch: int
    global_step: int = 0
    epoch: int = 0
    skipped_images: list = field(default_factory=list)
    held_out: str = None  # the rows --validation_split took out of training (data.split_rows)

    def state_dict(self):
        return asdict(self)

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
        self.epoch = self.global_step // self.steps_per_epoch  # the epoch the next step belongs to


def read_state(path):
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def list_checkpoints(output_dir):
    """Complete checkpoints as (step, path), oldest first. Temporary or foreign folders are ignored."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if match and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(args):
    """The checkpoint folder to resume from, or None for a new run."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.warning(f"No complete checkpoint in {args.output_dir!r}; starting a new training run.")
            return None
        return checkpoints[-1][1]
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(os.path.normpath(path)))
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        available = ", ".join(os.path.basename(p) for _, p in list_checkpoints(args.output_dir)) or "none"
        fail(f"Checkpoint {args.resume_from_checkpoint!r} does not exist or is incomplete in {args.output_dir!r} "
             f"(complete checkpoints: {available}).")
    return path


def set_aside_newer(accelerator, output_dir, step):
    """Resuming from an older checkpoint abandons the newer ones. Move them into OUTPUT_DIR/abandoned-after-
    checkpoint-STEP (never deleted), so that rotation and `latest` only see the run that goes on."""
    if accelerator.is_main_process:
        newer = [path for s, path in list_checkpoints(output_dir) if s > step]
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

    if resume_path is not None:
        recorded = read_state(resume_path).get("seed")
        if args.seed is not None and recorded is not None and recorded != args.seed:
            logger.warning(f"--seed {args.seed} differs from the checkpoint's seed {recorded}; using {args.seed}.")
        return args.seed if args.seed is not None else recorded
    if args.seed is not None:
        return args.seed
    return broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]


def restore(accelerator, path, state):
    """Load what accelerate saved (and, through the hooks, the model and its EMA), then the run's position."""
    accelerator.print(f"Resuming from {path}")
    accelerator.load_state(path)
    state.load_state_dict(read_state(path))


def save(accelerator, output_dir, state, total_limit, before_remove=None):
    """Write checkpoint-STEP atomically: into a temporary folder, renamed when complete; rotate after.
    before_remove(path) runs before an old checkpoint is deleted (to let its background upload finish)."""
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    temp = os.path.join(output_dir, f".tmp-checkpoint-{state.global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp)
    faults.at(f"save:{state.global_step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temp, STATE_FILE), "w") as f:
            json.dump(state.state_dict(), f, indent=2)
        if os.path.isdir(final):  # a checkpoint of this step from an earlier, abandoned run
            shutil.rmtree(final)
        os.replace(temp, final)
        for name in os.listdir(output_dir):  # leftovers of saves that were killed
            if name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                if before_remove is not None:
                    before_remove(old)
                logger.info(f"Removing old checkpoint {old}")
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class ModelStateHooks:
    """accelerate's save_state / load_state hooks: the trained model (and its EMA) go into a checkpoint in diffusers
    format instead of accelerate's anonymous model.safetensors, so a checkpoint loads with `from_pretrained`."""

    def __init__(self, accelerator, stage, ema=None, lora=False, ema_device="cpu"):
        self.accelerator, self.stage, self.ema, self.lora, self.ema_device = accelerator, stage, ema, lora, ema_device

    def register(self):
        self.accelerator.register_save_state_pre_hook(self.save)
        self.accelerator.register_load_state_pre_hook(self.load)

    def _ours(self, model):
        return isinstance(self.accelerator.unwrap_model(model), self.stage.model_cls)

    def save(self, models, weights, output_dir):
        # Every rank pops the weights it handles (DeepSpeed-safe); only the main process writes.
        sub = self.stage.subfolder
        for i, model in enumerate(models):
            if not self._ours(model):
                continue
            if self.accelerator.is_main_process:
                unwrapped = self.accelerator.unwrap_model(model)
                if self.lora:
                    unwrapped.save_lora_adapter(os.path.join(output_dir, f"{sub}_lora"))
                else:
                    unwrapped.save_pretrained(os.path.join(output_dir, sub))
                if self.ema is not None:
                    self.ema.save_pretrained(os.path.join(output_dir, f"{sub}_ema"))
            if weights:
                weights.pop(i)

    def load(self, models, input_dir):
        sub, model_cls = self.stage.subfolder, self.stage.model_cls
        for i in reversed(range(len(models))):
            if not self._ours(models[i]):
                continue
            unwrapped = self.accelerator.unwrap_model(models[i])
            if self.lora:
                from peft.utils import set_peft_model_state_dict
                from safetensors.torch import load_file

                adapter = os.path.join(input_dir, f"{sub}_lora", "pytorch_lora_weights.safetensors")
                result = set_peft_model_state_dict(unwrapped, load_file(adapter))
                # peft reports what did not fit instead of raising: a silently restarted adapter is worse.
                missing = [k for k in result.missing_keys if "lora_" in k]
                if result.unexpected_keys or missing:
                    fail(f"The LoRA adapter {adapter} does not fit the model ({len(result.unexpected_keys)} "
                         f"unexpected, {len(missing)} missing weights): resume with the --rank and --lora_alpha "
                         "of the run that wrote it.")
            else:
                unwrapped.load_state_dict(model_cls.from_pretrained(os.path.join(input_dir, sub)).state_dict())
            if self.ema is not None:
                from diffusers.training_utils import EMAModel

                loaded = EMAModel.from_pretrained(os.path.join(input_dir, f"{sub}_ema"), model_cls,
                                                  foreach=self.ema.foreach)
                self.ema.load_state_dict(loaded.state_dict())
                self.ema.to(self.ema_device)
            models.pop(i)
