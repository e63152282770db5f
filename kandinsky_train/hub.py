# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--push_to_hub: the repository is created before training (a missing login stops the run at once), checkpoints
upload in the background with --hub_push_checkpoints, and the final folder goes up with its model card."""

import json
import logging
import os
from pathlib import Path

from . import faults
from .errors import fail, first_line
from .model_card import write_model_card
from .preemption import finishing
from .tracking import wandb_run_url

logger = logging.getLogger(__name__)

# Written beside the final folder once it and its card are complete, with --push_to_hub: whether the upload is done.
FINAL_SAVE = ".final-save.json"
# What never goes to the Hub with the final folder: training state, logs, cache, validation renders.
HUB_IGNORE = ["checkpoint-*", ".tmp-checkpoint-*", "abandoned-after-checkpoint-*", "logs", "logs/**",
              "embedding_cache", "embedding_cache/**", "validation", "validation/**", FINAL_SAVE]


def create_repo(args, accelerator):
    """With --push_to_hub, create (or find) the Hub repository before anything is trained, so that a missing login
    or a name that is not yours stops the run now rather than after its last step. Returns its id (main process)."""
    if not args.push_to_hub or not accelerator.is_main_process:
        return None
    from huggingface_hub import create_repo as hub_create_repo

    name = args.hub_model_id or Path(args.output_dir).name
    try:
        return hub_create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as error:  # offline, no token, no write access, name taken: all say the same to the user
        fail(f"--push_to_hub: could not create or reach the Hub repository {name!r} ({first_line(error)}). Log in "
             "with `hf auth login` (or give --hub_token), choose another --hub_model_id, or drop --push_to_hub.")


class CheckpointUploads:
    """--hub_push_checkpoints: each checkpoint's model weights upload in a background thread (huggingface_hub's
    run_as_future) while training goes on; never its optimizer or RNG state. Does nothing when not asked for."""

    def __init__(self, args, repo_id, subfolder):
        self.enabled = bool(args.hub_push_checkpoints and repo_id)
        self.repo_id, self.token, self.subfolder = repo_id, args.hub_token, subfolder
        self.pending = {}  # checkpoint path -> its upload

    def push(self, path):
        if not self.enabled:
            return
        from huggingface_hub import upload_folder

        name, sub = os.path.basename(path), self.subfolder
        self.pending[path] = upload_folder(
            repo_id=self.repo_id, folder_path=path, path_in_repo=name, token=self.token,
            allow_patterns=[f"{sub}/**", f"{sub}_ema/**", f"{sub}_lora/**"], commit_message=f"Checkpoint {name}",
            run_as_future=True)

    def wait(self, path=None):
        """Wait for the uploads (of one checkpoint, with `path`); a failure is a warning: the files are on disk."""
        for done in [path] if path is not None else list(self.pending):
            future = self.pending.pop(done, None)
            if future is None:
                continue
            try:
                future.result()
            except Exception as error:
                logger.warning(f"The upload of {done} to the Hub failed: {first_line(error)}")


def publish(args, accelerator, stage_name, base_model, snippet, images, repo_id, summary, extra_yaml=None, notes=()):
    """Write the model card of the saved output (with the run's own figures, `summary`) and, with --push_to_hub,
    upload the folder (no checkpoints, logs, validation images or cache)."""
    title = f"Kandinsky 2.2 {stage_name}" + (" LoRA" if args.use_lora else "")
    write_model_card(args, title, base_model, snippet, images, summary, extra_yaml, notes,
                     wandb_url=wandb_run_url(accelerator))
    if args.push_to_hub:
        _record_final_save(args, title, uploaded=False)
        upload_final(args, accelerator, repo_id, title)
    accelerator.print(f"Saved the fine-tuned {title} to {args.output_dir}")


def upload_final(args, accelerator, repo_id, title):
    """Upload the complete final folder; a signal or a failure on the way says how to finish the upload alone."""
    from huggingface_hub import upload_folder

    ignore = HUB_IGNORE + [args.logging_dir, f"{args.logging_dir}/**"]
    # `hf upload`'s --exclude takes single-level globs; a folder's name is covered by its "name/*"
    excludes = " ".join(f'--exclude "{pattern}"' for pattern in dict.fromkeys(
        p.replace("/**", "/*") for p in ignore if f"{p}/**" not in ignore))
    command = f"hf upload {repo_id} {args.output_dir} . {excludes}"
    missing = (f"The fine-tuned {title} is saved, complete, in {args.output_dir}; only its upload to the Hub is "
               f"missing. Upload it with: {command} (or run the same command with --resume_from_checkpoint latest: "
               "it uploads it and trains nothing).")
    finishing("the upload to the Hub", advice=missing)
    faults.at("upload")
    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      commit_message=f"Fine-tuned {title}", ignore_patterns=ignore)
    except Exception as error:  # the output is complete on disk: say so, and how to upload it later
        fail(f"The upload to the Hub repository {repo_id!r} failed ({first_line(error)}). The fine-tuned {title} "
             f"is saved in {args.output_dir}; upload it later with: {command} (or run the same command with "
             "--resume_from_checkpoint latest).")
    _record_final_save(args, title, uploaded=True)
    accelerator.print(f"Pushed {args.output_dir} to {repo_id}")


def upload_missing(args, accelerator, repo_id):
    """`--resume_from_checkpoint latest` on a run whose final save is complete but whose upload is not (stopped or
    failed during it): upload that folder and train nothing. Returns whether it did. A record of another run's
    final save (other --max_train_steps / --num_train_epochs, or no --resume_from_checkpoint latest) is removed:
    this run writes its own final save."""
    path = Path(args.output_dir) / FINAL_SAVE
    record = json.loads(path.read_text()) if path.is_file() else None
    if record is None:
        return False
    if not (args.push_to_hub and args.resume_from_checkpoint == "latest" and not record["uploaded"]
            and record["length"] == _run_length(args)):
        accelerator.wait_for_everyone()  # every process has read it
        if accelerator.is_main_process:
            path.unlink()
        return False
    if accelerator.is_main_process:
        accelerator.print(f"The final save in {args.output_dir} is complete; only its upload to the Hub is missing: "
                          "uploading it (nothing to train).")
        upload_final(args, accelerator, repo_id, record["title"])
    accelerator.wait_for_everyone()
    return True


def _run_length(args):
    return [args.max_train_steps, args.num_train_epochs]


def _record_final_save(args, title, uploaded):
    (Path(args.output_dir) / FINAL_SAVE).write_text(json.dumps(
        {"title": title, "length": _run_length(args), "uploaded": uploaded}))
