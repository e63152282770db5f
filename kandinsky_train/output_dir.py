# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--output_dir, checked before anything is written to it: it can be written, it is none of the folders the run
reads, it holds no work of the other stage, and this run would overwrite no checkpoint (an earlier run's, or a
half-written one)."""

import json
import os
import tempfile

from .checkpoint_folders import (CHECKPOINT_RE, SCALER_FILE, STAGE_PIPELINES, Layout, is_reference, named_checkpoint,
                                 refuse_other_kind, scan, stage_of, step_of)
from .errors import fail


def check_output_dir(args, stage):
    """Everything this run would do to --output_dir is safe, before anything is written there."""
    if not args.output_dir:  # "" would be the current folder to some calls and no folder at all to others
        fail("--output_dir is empty: name the folder the checkpoints and the fine-tuned model go to.")
    _check_output_is_writable(args.output_dir)
    _check_output_is_not_an_input(args)
    _check_readme(args.output_dir)
    _check_other_stage(args, stage)
    _check_checkpoints(args, stage)


def _check_checkpoints(args, stage):
    """No earlier run's checkpoints without --resume_from_checkpoint, a resumable checkpoint when one is named, and
    no half-written checkpoint where this run will save one."""
    layout = Layout.of(args, stage)
    complete, incomplete = scan(args.output_dir, layout)
    if args.resume_from_checkpoint is None:
        earlier = [os.path.basename(path) for _, path in complete]
        if earlier:  # a new run would overwrite them step by step, and rotation would delete its own first
            fail(f"--output_dir {args.output_dir!r} already holds checkpoints of an earlier run "
                 f"({', '.join(earlier[-3:])}). Add --resume_from_checkpoint latest to continue it, or choose "
                 "another --output_dir to start a new run.")
    start = complete[-1][0] if args.resume_from_checkpoint == "latest" and complete else 0
    if args.resume_from_checkpoint not in (None, "latest"):
        name = os.path.basename(os.path.normpath(args.resume_from_checkpoint))
        if not CHECKPOINT_RE.match(name):
            fail(f'--resume_from_checkpoint takes "latest" or a folder named checkpoint-<step>, got '
                 f"{args.resume_from_checkpoint!r}.")
        start = step_of(named_checkpoint(args, layout))
    for step, path, missing in incomplete:
        if step > start:  # this run would save its own checkpoint of that step over it
            refuse_other_kind(path, layout)  # a LoRA run's checkpoint for a full fine-tune, or the reverse
            name, lacks = os.path.basename(path), ", ".join(missing)
            if missing == [SCALER_FILE]:  # only an fp16 run saves it: most likely another precision's checkpoint
                fail(f"--output_dir {args.output_dir!r} holds {name}, which has no {SCALER_FILE} (fp16's loss scale) "
                     "that this fp16 run needs to resume: it was saved in another precision (resume with that "
                     "--mixed_precision) or lost the file (restore it), and this run would save its own checkpoint "
                     "of that step there.")
            if not is_reference(path):  # training_state.json is written last: the save was complete once
                newest = os.path.basename(complete[-1][1]) if complete else None
                fail(f"--output_dir {args.output_dir!r} holds {name}, which was saved complete but now lacks {lacks} "
                     f"(a partial copy or sync?), so it cannot be resumed (the newest complete checkpoint is "
                     f"{newest or 'none'}), and this run would save its own checkpoint of that step there. Restore "
                     f"the missing files, or move {name} out of --output_dir to "
                     f"{f'go on from {newest}' if newest else 'start over'}, then run again.")
            fail(f"--output_dir {args.output_dir!r} holds {name}, which is not a complete checkpoint (it lacks "
                 f"{lacks}; perhaps the half-written save of a run that was killed), and this run would save its own "
                 "checkpoint of that step there. Move it out of --output_dir (or delete it), then run again.")


def _check_output_is_writable(output_dir):
    """--output_dir is a folder, or can become one, and can be written, checked with a file created and removed at
    once in it or in its nearest existing parent (permissions, a read-only mount)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        fail(f"--output_dir {output_dir!r} is a file, not a folder: choose another --output_dir.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--output_dir {output_dir!r} cannot be created: {existing!r} is a file.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        fail(f"--output_dir {output_dir!r} cannot be written ({existing!r}: {error.strerror or error}): choose a "
             "folder you can write to.")


def _check_output_is_not_an_input(args):
    """The final save and the checkpoints must never land in (or over) the models or images the run reads, nor the
    final save's folders (unet/, ...) and its cleanup after a failed save reach into them."""
    output = os.path.realpath(args.output_dir)
    for flag, path, folder in local_inputs(args):
        if output == folder or _inside(output, folder) or _inside(folder, output):
            if _inside(folder, output):  # the final save writes unet/, movq/, ... and removes them if it fails
                fail(f"--output_dir {args.output_dir!r} contains {flag} {path!r}: the run would write its final save "
                     "(and remove it again if the save fails) among what it reads. Choose an --output_dir that does "
                     "not hold it.")
            where = "is" if output == folder else "is inside"
            fail(f"--output_dir {args.output_dir!r} {where} {flag} {path!r}: the run would write its checkpoints and "
                 "final save over what it reads. Choose an --output_dir outside it.")


def local_inputs(args):
    """(flag, path, real path) of each local folder the run reads: the models and the data (a Hub id has none)."""
    inputs = (("--pretrained_prior_model_name_or_path", args.pretrained_prior_model_name_or_path),
              ("--pretrained_decoder_model_name_or_path", args.pretrained_decoder_model_name_or_path),
              ("--train_data_dir", args.train_data_dir), ("--dataset_name", args.dataset_name),
              ("--validation_data_dir", args.validation_data_dir),
              ("--validation_dataset_name", getattr(args, "validation_dataset_name", None)))
    return [(flag, path, os.path.realpath(path)) for flag, path in inputs if path is not None and os.path.isdir(path)]


def _check_readme(output_dir):
    """The final save writes its model card as OUTPUT_DIR/README.md: a README.md there that is not a card of ours
    (an earlier run's, told by its tags) is the user's, and is never replaced."""
    from .model_card import is_our_card

    readme = os.path.join(output_dir, "README.md")
    if os.path.lexists(readme) and not is_our_card(readme):
        fail(f"--output_dir {output_dir!r} holds a README.md that is not a model card of these scripts: the final "
             "save writes its model card as README.md and would replace it. Move it out of --output_dir, or choose "
             "another --output_dir.")


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder and path != folder


def _check_other_stage(args, stage):
    """The two stages' checkpoints have the same names and their final saves the same model_index.json: one
    --output_dir serves one stage, and the other stage's work there is never resumed, rotated or overwritten."""
    other = next(name for name in STAGE_PIPELINES if name != stage)
    found = [name for name in sorted(os.listdir(args.output_dir)) if CHECKPOINT_RE.match(name)
             and stage_of(os.path.join(args.output_dir, name)) == other] if os.path.isdir(args.output_dir) else []
    index = os.path.join(args.output_dir, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                pipeline = json.load(f).get("_class_name")
        except (OSError, ValueError):
            pipeline = None
        if pipeline in STAGE_PIPELINES[other]:
            found.append(f"the final {pipeline} in model_index.json")
    if found:
        fail(f"--output_dir {args.output_dir!r} holds the {other}'s training ({', '.join(found[:3])}"
             f"{', ...' if len(found) > 3 else ''}); this is the {stage}. Give each stage its own --output_dir: "
             f"the {stage}'s checkpoints and final save would mix with the {other}'s and overwrite them.")
