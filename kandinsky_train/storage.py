# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""A full disk. Before a large write the free space is checked against what it will take, so that the common case
stops before anything is half-written; a write that runs out of space all the same has its partial output removed.
Both end in one line (a UserError: exit code 2) that names the folder, the bytes needed and the bytes free, instead
of a library's traceback (torch.save says "unexpected pos", safetensors "I/O error")."""

import contextlib
import errno
import os
import shutil

from . import faults
from .errors import UserError, fail

# A write that failed while less than this was free ran out of space, whatever the library called the error.
NEARLY_FULL = 1 << 20


def free_bytes(path):
    """Bytes a normal user may still write on the filesystem that holds `path` (or would hold it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
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


def ran_out_of_space(error, folder):
    """Whether a failed write failed for lack of space: ENOSPC (or a quota) anywhere in the exception's chain, or
    libraries that wrap it (torch.save's "unexpected pos") while the disk is (nearly) full."""
    seen = error
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or os.strerror(errno.ENOSPC) in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(folder) < NEARLY_FULL


def remove(path):
    if path is None or not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


@contextlib.contextmanager
def writing(what, folder, needed, partial=None, advice="", outcome=None, basis="the size of its tensors", free=None,
            fault_point=None):
    """Write `what` (about `needed` bytes, how that was reckoned: `basis`) into `folder`: stop before the write when
    the room is short (`free`: as the caller measured it, else measured here); if it runs out of space all the same,
    remove `partial` (the half-written file or folder) and stop with one line. Other errors pass through unchanged.
    `fault_point`: where the tests inject ENOSPC."""
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
        remove(partial)
        if outcome is None:
            outcome = "What it had written was removed." if partial else ""
        no_space(what, folder, needed, basis, free_bytes(folder), outcome, advice)


def save_output(what, save, folder, needed):
    """A final output written straight into `folder` (too large to write twice for atomicity), with the room checked
    first and a full disk during the write turned into one line."""
    with writing(what, folder, needed, basis="the size of its weights",
                 outcome=f"{what[0].upper()}{what[1:]} in it is incomplete.",
                 advice="Free some space and run the same command with --resume_from_checkpoint latest: it resumes "
                 "from the newest checkpoint (untouched) and saves it again.", fault_point="final"):
        save(folder)
