# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Errors a user can fix: raised anywhere as `UserError`, printed by `main_guard` as one line without a traceback."""

import contextlib
import sys


class UserError(Exception):
    """A problem with the command line or the data that the user can fix; printed without a traceback."""


class Stopped(BaseException):
    """A signal after training's last step (final validation, save or upload): the checkpoints are complete, so the
    process stops where it is. A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def fail(message):
    raise UserError(message)


def first_line(error):
    """The first line of an exception's message (libraries often add pages of context below it)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def reason(error):
    """Why a library call failed: the innermost exception it wraps (datasets says only "An error occurred while
    generating the dataset" and chains the UnicodeDecodeError or ValueError that says why), named with its type;
    for an exception that wraps none, the last line of its message (where pyarrow and datasets put the reason)."""
    cause = error
    while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
        cause = cause.__cause__ or cause.__context__
    if cause is error:
        text = str(error).strip()
        return text.splitlines()[-1] if text else type(error).__name__
    return f"{type(cause).__name__}: {first_line(cause)}"


@contextlib.contextmanager
def loading(what, flag, path):
    """Turn the loaders' deep tracebacks into one line that names the flag to fix."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as error:
        fail(f"Could not load the {what} from {flag} {path!r}: {first_line(error)}")


def main_guard(main):
    """Run main(); a UserError becomes one clear line on stderr and exit code 2, a stop after training one line and
    the signal's exit code."""
    try:
        main()
    except UserError as error:
        _close_progress_bars()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stopped:
        _close_progress_bars()
        print(f"stopped: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_code)


def _close_progress_bars():
    """A run stopped mid-training leaves its progress bar's line open (tqdm returns to the line's start, not to a new
    line): closing the bars ends it, so that the message has a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", None) or []):
        bar.close()
