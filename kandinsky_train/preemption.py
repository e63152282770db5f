# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Stopping cleanly on preemptible machines. During training, SIGTERM / SIGINT become a request that the loop
honours at the next optimizer step (checkpoint, then exit), agreed by every process, also when only the launcher
was signalled. After the last step (final validation, save, upload) there is no step to wait for and the
checkpoints are complete: a signal stops the process at once and says what did not finish."""

import ctypes
import os
import re
import signal
import sys

import torch

from .errors import Stopped

_PARENT_AT_START = os.getppid()
_active = None  # the StopRequest of the training in this process


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next optimizer step and exits."""

    def __init__(self):
        global _active
        self.signal = None
        self._pending = None
        self.phase = None  # after training: what the process is doing (a signal then stops it there)
        self.trained = ""  # after training: where training ended, for the message
        self.advice = None  # after training: what to do, where the phase knows better than "redo it"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        follow_launcher()
        _active = self

    def _handle(self, signum, frame):
        if self.phase is not None:
            raise Stopped(f"received {signal.Signals(signum).name} during {self.phase}. " + (self.advice or (
                f"{self.trained} Not finished: {self.phase} and what follows it; run the same command with "
                "--resume_from_checkpoint latest to redo them.")), 128 + signum)
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            return  # keep the first reason (Ctrl-C also ends the launcher, which then means a SIGTERM here)
        self.signal = signum

    def requested(self, accelerator):
        if accelerator.num_processes == 1:
            return self.signal is not None
        # Every rank must stop at the same step, or a barrier hangs: they agree through an all-reduce. Its result
        # is read one step later, once the GPU has finished the step it was queued behind, so no step waits for
        # the host (all ranks stop one step after the signal, alike).
        local = torch.tensor(float(self.signal is not None), device=accelerator.device)
        agreed, self._pending = self._pending, accelerator.reduce(local, "sum")
        flag = agreed is not None and bool(agreed.item() > 0)
        if flag and self.signal is None:
            self.signal = signal.SIGTERM
        return flag

    def exit_code(self):
        """0 for SIGTERM (the scheduler asked: a normal end), 128 + N otherwise (130 for Ctrl-C), as shells do."""
        return 0 if self.signal == signal.SIGTERM else 128 + self.signal

    def training_ended(self, trained):
        """From now on a signal stops the process where it is; `trained` says where training ended."""
        self.trained = trained
        self.phase = "the end of training"


def finishing(phase, advice=None):
    """After training, name what the process does now (final validation, save, upload) for a signal's message, and
    what to do if it stops there (default: the same command with --resume_from_checkpoint latest redoes it)."""
    if _active is not None and _active.phase is not None:
        _active.phase, _active.advice = phase, advice


def follow_launcher():
    """`accelerate launch` with one process dies on SIGTERM without passing it on (Kubernetes and `kill PID`
    signal only the launcher), which would leave training running orphaned until a SIGKILL loses its progress.
    Ask Linux to send this process SIGTERM when the launcher dies; only under a launcher, so that a run started
    with `nohup python ...` does not stop with the shell that started it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open(f"/proc/{_PARENT_AT_START}/cmdline", "rb") as f:
            parent = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if not re.search(r"accelerate|torchrun|torch\.distributed\.(run|launch)", parent):
        return
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM)) != 0:
        return
    if os.getppid() != _PARENT_AT_START:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
