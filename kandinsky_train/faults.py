# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""For testing only. The test suite drives the real scripts through these environment variables, read once here;
unset (as in every real run), these hooks do nothing.

KANDINSKY_TRAIN_FAULT=<point>:<SIGNAL> sends this process a real signal at a point: "micro:N" before the N-th
micro-batch of the run (counted over epochs), "save:STEP" while checkpoint-STEP is being written, "upload" as the
final upload to the Hub starts; only on the process of rank KANDINSKY_TRAIN_FAULT_RANK when that is set.
<point>:ENOSPC instead raises the error a full disk gives, at "save:STEP" or "final" (when the final pipeline has
been written).
KANDINSKY_TRAIN_TRACE=FILE appends the sample indices of every micro-batch as JSON lines, to prove that a resumed
run sees exactly the data an uninterrupted one sees.
KANDINSKY_TRAIN_COMPILE_BACKEND=aot_eager gives --torch_compile another backend than Inductor, whose C++ builds take
minutes per graph on a small CPU: a test of which graphs are compiled and of resuming stays fast.
KANDINSKY_TRAIN_DISK=FOLDER:BYTES makes the free-space checks see FOLDER as a disk of BYTES, of which what lies
under it is used: a small disk without mounting one (which needs root).
"""

import errno
import json
import os
import signal

_FAULT = os.environ.get("KANDINSKY_TRAIN_FAULT", "")
_FAULT_RANK = os.environ.get("KANDINSKY_TRAIN_FAULT_RANK")
_TRACE = os.environ.get("KANDINSKY_TRAIN_TRACE")
_COMPILE_BACKEND = os.environ.get("KANDINSKY_TRAIN_COMPILE_BACKEND", "inductor")  # torch.compile's default
_DISK = os.environ.get("KANDINSKY_TRAIN_DISK")


def simulated_disk(path):
    """(folder, bytes) of the simulated disk that holds `path`, or None (the real filesystem)."""
    if not _DISK:
        return None
    folder, size = _DISK.rsplit(":", 1)
    folder = os.path.abspath(folder)
    inside = os.path.commonpath([folder, os.path.abspath(path)]) == folder
    return (folder, int(size)) if inside else None


def at(point):
    """Send the configured signal (or raise the configured error) if this is the configured point (and rank)."""
    if not _FAULT or (_FAULT_RANK is not None and _FAULT_RANK != os.environ.get("RANK", "0")):
        return
    where, name = _FAULT.rsplit(":", 1)
    if where != point:
        return
    if name == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), getattr(signal, "SIG" + name))


def observed(batches, rank, epoch, first_micro):
    """Wrap one epoch's (micro-batch index, batch) pairs with the fault points and the trace."""
    if not _FAULT and not _TRACE:
        yield from batches
        return
    for batch_index, batch in batches:
        at(f"micro:{first_micro + batch_index}")
        if _TRACE:
            with open(_TRACE, "a") as trace:
                trace.write(json.dumps({"rank": rank, "epoch": epoch, "micro": batch_index,
                                        "index": batch["index"].tolist()}) + "\n")
        yield batch_index, batch


def compile_backend():
    return _COMPILE_BACKEND
