# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""A full disk. Before a large write the free space is checked against what it will take, so that the common case
stops before anything is half-written; a write that runs out of space all the same has its partial output removed.
Both end in one line (a UserError: exit code 2) that names the folder, the bytes needed and the bytes free, instead
of a library's traceback (torch.save says "unexpected pos", safetensors "I/O error")."""

import contextlib
import errno
import os
import re
import shutil
import stat

from . import faults
from .checkpoint_folders import list_checkpoints
from .errors import UserError, fail

# A write that failed while less than this was free ran out of space, whatever the library called the error.
NEARLY_FULL = 1 << 20
# The error numbers of a full disk and of a full quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How Rust's std::io::Error ends its message (safetensors' SafetensorError carries it: "... (os error 28)").
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def free_bytes(path):
    """Bytes a normal user may still write on the filesystem that holds `path` (or would hold it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    simulated = faults.simulated_disk(path)  # for testing only
    if simulated:
        folder, size = simulated
        return max(0, size - tree_bytes(folder))
    return shutil.disk_usage(path).free


def tree_bytes(path):
    """Disk space the files under `path` take (allocated blocks, as `du` counts them)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    return sum(os.stat(os.path.join(root, name)).st_blocks * 512
               for root, _, names in os.walk(path) for name in names)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(*objects):
    """What saving these models takes: their weights and buffers (objects that are not models count nothing)."""
    import torch

    modules = [m for m in objects if isinstance(m, torch.nn.Module)]
    return sum(tensor_bytes(m.parameters()) + tensor_bytes(m.buffers()) for m in modules)


def human(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def no_space(what, folder, needed, basis, free, outcome="", advice=""):
    fail(" ".join(part for part in (f"Not enough disk space to write {what} in {folder}: it needs about "
                                    f"{human(needed)} ({basis}), {human(free)} free.", outcome, advice) if part))


def check_room(what, folder, needed, basis, advice="", free=None):
    """Stop before writing when the filesystem has less than `needed` bytes free (`free`: measured by the caller)."""
    free = free_bytes(folder) if free is None else free
    if free < needed:
        no_space(what, folder, needed, basis, free, "Nothing was written.", advice)


def says_no_space(error):
    """Whether this exception itself says the disk (or the quota) is full: an OSError's errno, or the message of a
    library that reports the OS error in words, such as safetensors' SafetensorError ("Error while serializing: I/O
    error: No space left on device (os error 28)"), which is no OSError."""
    if getattr(error, "errno", None) in NO_SPACE:
        return True
    text = str(error)
    return (any(os.strerror(code) in text for code in NO_SPACE)
            or any(int(code) in NO_SPACE for code in RUST_OS_ERROR.findall(text)))


def ran_out_of_space(error, folder):
    """Whether a failed write failed for lack of space: an exception in its chain says so, or a library wrapped it
    in words that do not (torch.save's "unexpected pos") and the disk is (nearly) full."""
    seen = error
    while seen is not None:
        if says_no_space(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(folder) < NEARLY_FULL


def remove(paths):
    """Delete the files and folders among `paths` (one path or a list) that exist."""
    for path in paths if isinstance(paths, list) else [paths]:
        if path is None or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


@contextlib.contextmanager
def writing(what, folder, needed, partial=None, advice="", outcome=None, basis="the size of its tensors", free=None,
            fault_point=None):
    """Write `what` (about `needed` bytes, how that was reckoned: `basis`) into `folder`: stop before the write when
    the room is short (`free`: as the caller measured it, else measured here); if it runs out of space all the same,
    remove `partial` (the half-written file or folder, a list of them, or a function that lists them) and stop with
    one line. Other errors pass through unchanged. `fault_point`: where the tests inject ENOSPC."""
    check_room(what, folder, needed, basis, advice, free)
    try:
        yield
        if fault_point:
            faults.at(fault_point)
    except UserError:
        raise
    except Exception as error:
        if not ran_out_of_space(error, folder):
            raise
        remove(partial() if callable(partial) else partial)
        if outcome is None:
            outcome = "What it had written was removed." if partial else ""
        no_space(what, folder, needed, basis, free_bytes(folder), outcome, advice)


def save_output(what, save, folder, needed, written, layout):
    """A final output written straight into `folder` (too large to write twice for atomicity), with the room checked
    first. If the disk fills up during the write, what it wrote under `written` (names in `folder`) is removed: a
    half-written pipeline must neither pass for a whole one nor keep the last free bytes. What was there before and
    the save left alone stays (a folder of the user's, a file the save does not write); the checkpoints stay. The
    advice names the checkpoint `--resume_from_checkpoint latest` would take: the newest complete one of the run's
    `layout` (checkpoint_folders.Layout)."""
    before = _snapshot(folder, written)
    complete = list_checkpoints(folder, layout)
    advice = (f"Free some space and run the same command with --resume_from_checkpoint latest: it resumes from "
              f"{os.path.basename(complete[-1][1])} (untouched) and saves it again." if complete else
              "This run saved no checkpoint to resume from: free some space and run the same command again.")
    with writing(what, folder, needed, partial=lambda: _written_since(folder, written, before),
                 basis="the size of its weights", fault_point="final", advice=advice):
        save(folder)


def _snapshot(folder, names):
    """{path: stamp} of everything under folder/NAME for each name: a folder's stamp is None, a file's says whether
    it was rewritten since (inode, size, modification time)."""
    found = {}
    for top in (os.path.join(folder, name) for name in names):
        paths = [top] if os.path.lexists(top) else []
        if os.path.isdir(top) and not os.path.islink(top):
            paths += [os.path.join(root, name) for root, dirs, files in os.walk(top) for name in dirs + files]
        for path in paths:
            st = os.lstat(path)
            found[path] = None if stat.S_ISDIR(st.st_mode) else (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def _written_since(folder, names, before):
    """What a save wrote under folder/NAME since `before` (a _snapshot): the files and folders it created and the
    files it rewrote (their earlier content is gone already); a created folder stands for what it holds."""
    after = _snapshot(folder, names)
    made = [path for path, stamp in after.items() if path not in before or before[path] != stamp]
    created = [path for path in made if after[path] is None]
    return [path for path in made if not any(path.startswith(top + os.sep) for top in created)]


def save_pipeline(pipe, folder, layout):
    """A diffusers pipeline's save_pretrained: model_index.json and a folder per component."""
    save_output("the fine-tuned pipeline", pipe.save_pretrained, folder, module_bytes(*pipe.components.values()),
                written=["model_index.json", *pipe.components], layout=layout)


def save_lora_adapter(model, folder, layout):
    """The trained LoRA adapter of a diffusers model, as one file."""
    save_output("the LoRA adapter", lambda to: model.save_lora_adapter(to, weight_name=LORA_WEIGHTS), folder,
                tensor_bytes(p for p in model.parameters() if p.requires_grad), written=[LORA_WEIGHTS], layout=layout)


def save_trained(trained, folder, layout, make_pipeline):
    """A run's final save: the LoRA adapter file with --use_lora (layout.lora); else the pipeline that
    make_pipeline(model) builds around the trained model, holding the EMA's weights when the run kept an EMA."""
    if layout.lora:
        save_lora_adapter(trained.model, folder, layout)
        return
    if trained.ema is not None:
        trained.ema.copy_to(trained.model.parameters())
    save_pipeline(make_pipeline(trained.model), folder, layout)
