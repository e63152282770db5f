# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Which folders of OUTPUT_DIR are checkpoints, and which one a run resumes from. A folder named checkpoint-STEP
is complete when it holds every file a resume reads: ours (with training_state.json, written last) and diffusers'
reference scripts' (the same accelerate layout, no training_state.json) alike, since a complete save can lose a file
later (a partial copy or sync). Other folders named so are incomplete: never resumed, never overwritten or deleted."""

import glob
import json
import logging
import os
import re
from dataclasses import dataclass

from .errors import fail

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
MODEL_FOLDERS = {"prior": "prior", "decoder": "unet"}  # the trained model's folder in a checkpoint, per stage
# The pipelines each stage's final save writes as OUTPUT_DIR/model_index.json.
STAGE_PIPELINES = {"prior": ("KandinskyV22PriorPipeline",), "decoder": ("KandinskyV22Pipeline",)}
RESUME_FILES = ("optimizer.bin", "scheduler.bin", "random_states_*.pkl")  # what accelerate's load_state reads
SCALER_FILE = "scaler.pt"  # fp16's loss scale: accelerate saves it, and its load_state reads it, with fp16 only


@dataclass(frozen=True)
class Layout:
    """What a checkpoint of this run holds beside accelerate's files: the trained model in SUBFOLDER/ (its adapters
    in SUBFOLDER_lora/ with --use_lora), with --use_ema its EMA in SUBFOLDER_ema/, and with fp16 (`scaler`) the
    gradient scaler's scaler.pt."""

    subfolder: str
    ema: bool = False
    lora: bool = False
    scaler: bool = False

    @classmethod
    def of(cls, args, stage_name):
        return cls(MODEL_FOLDERS[stage_name], ema=args.use_ema, lora=args.use_lora,
                   scaler=mixed_precision(args) == "fp16")

    def missing(self, path):
        """What the folder lacks for this run to resume from it; [] when it is a complete checkpoint. (The one
        place that says why a folder is not resumable: a further condition joins here.)"""
        needed = RESUME_FILES + ((SCALER_FILE,) if self.scaler else ())
        missing = [name for name in needed if not glob.glob(os.path.join(glob.escape(path), name))]
        sub = self.subfolder
        models = {f"{sub}_lora": False} if self.lora else {sub: True, **({f"{sub}_ema": True} if self.ema else {})}
        return missing + [f"{name}/" for name, config in models.items()
                          if not _holds_model(os.path.join(path, name), config)]


def mixed_precision(args):
    """The mixed precision accelerate will use: the flag, else `accelerate launch`'s setting or its config file's."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def _holds_model(folder, config):
    """A model saved by save_pretrained (config and weights) or an adapter file."""
    if config and not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    return bool(glob.glob(os.path.join(glob.escape(folder), "*.safetensors"))
                or glob.glob(os.path.join(glob.escape(folder), "*.bin")))


def is_reference(path):
    """Written by diffusers' reference scripts (or any accelerate run with their layout): no training_state.json."""
    return not os.path.isfile(os.path.join(path, STATE_FILE))


def stage_of(path):
    """Which stage wrote a checkpoint folder: the one its training_state.json records, else the one whose model
    folder (plain, _ema or _lora) it holds (older checkpoints of ours and the reference scripts' record none);
    None when neither tells."""
    if not is_reference(path):
        try:
            recorded = read_state(path).get("stage")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            return recorded
    for stage, sub in MODEL_FOLDERS.items():
        if any(os.path.isdir(os.path.join(path, sub + suffix)) for suffix in ("", "_ema", "_lora")):
            return stage
    return None


def step_of(path):
    return int(CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))).group(1))


def read_state(path):
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def scan(output_dir, layout):
    """The folders named checkpoint-STEP, oldest first: complete ones as (step, path), and the others as
    (step, path, what they lack). Temporary and otherwise named folders are not looked at."""
    complete, incomplete = [], []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if match and os.path.isdir(path):
                missing = layout.missing(path)
                if missing:
                    incomplete.append((int(match.group(1)), path, missing))
                else:
                    complete.append((int(match.group(1)), path))
    return sorted(complete), sorted(incomplete)


def list_checkpoints(output_dir, layout):
    """Complete checkpoints (ours and the reference scripts') as (step, path), oldest first."""
    return scan(output_dir, layout)[0]


def resume_path(args, layout):
    """The checkpoint folder this run would resume from, or None (a new run, or `latest` with none yet)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir, layout)
        return checkpoints[-1][1] if checkpoints else None
    return named_checkpoint(args, layout)


def resolve_resume(args, layout):
    """The checkpoint folder to resume from, or None for a new run (said when `latest` finds none)."""
    path = resume_path(args, layout)
    if path is None and args.resume_from_checkpoint == "latest":
        logger.warning(f"No complete checkpoint in {args.output_dir!r}; starting a new training run.")
    return path


def named_checkpoint(args, layout):
    """The folder --resume_from_checkpoint names (a path, or a name in --output_dir), checked complete."""
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(os.path.normpath(path)))
    missing = layout.missing(path) if os.path.isdir(path) else None
    if missing:
        refuse_other_kind(path, layout)
    if missing is None or missing:
        available = ", ".join(os.path.basename(p) for _, p in list_checkpoints(args.output_dir, layout)) or "none"
        fail(f"Checkpoint {args.resume_from_checkpoint!r} does not exist or is incomplete in {args.output_dir!r} "
             f"(complete checkpoints: {available})" + (f"; it lacks {', '.join(missing)}." if missing else "."))
    return path


def refuse_other_kind(path, layout):
    """A checkpoint this run cannot resume because it is of another kind, not because files are missing: the other
    stage's, a LoRA run's resumed as a full fine-tune (or the reverse), or one without an EMA resumed with --use_ema.
    One line that says which flag to change; nothing when the folder is of this run's kind."""
    name, sub = os.path.basename(os.path.normpath(path)), layout.subfolder
    stage = next(stage for stage, folder in MODEL_FOLDERS.items() if folder == sub)
    other = stage_of(path)
    if other not in (None, stage):
        fail(f"{path!r} is the {other}'s checkpoint ({MODEL_FOLDERS[other]}/), and this is the {stage}: resume the "
             f"{stage} from a checkpoint of its own (train_text_to_image_{other}.py resumes this one).")
    full, lora = (os.path.isdir(os.path.join(path, folder)) for folder in (sub, f"{sub}_lora"))
    if layout.lora and full and not lora:
        fail(f"{name} is a full fine-tune's checkpoint ({sub}/, no {sub}_lora/) and this run has --use_lora: resume "
             "it without --use_lora (a LoRA run starts in another --output_dir).")
    if not layout.lora and lora and not full:
        fail(f"{name} is a LoRA checkpoint ({sub}_lora/) and this run trains the whole model: resume it with "
             "--use_lora (and its --rank and --lora_alpha).")
    if layout.ema and full and not os.path.isdir(os.path.join(path, f"{sub}_ema")):
        fail(f"{name} holds no {sub}_ema/ that this --use_ema run needs to resume: it was saved without --use_ema "
             "(resume it without --use_ema) or lost the folder (restore it).")
