"""kandinsky_train.preemption in-process: a signal becomes a stop request with the shell's exit code."""

import os
import signal

import pytest

from fakes import FakeAccelerator
from kandinsky_train.preemption import StopRequest


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_is_a_request_and_a_normal_exit(restore_handlers):
    stop = StopRequest()
    accelerator = FakeAccelerator()
    assert not stop.requested(accelerator)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested(accelerator) and stop.exit_code() == 0


def test_ctrl_c_exits_130_and_a_second_one_stops_at_once(restore_handlers):
    stop = StopRequest()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C also ends the launcher, which then sends SIGTERM: keep Ctrl-C
    assert stop.requested(FakeAccelerator()) and stop.exit_code() == 130
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_after_training_a_signal_stops_at_once_and_says_what_did_not_finish(restore_handlers):
    from kandinsky_train.errors import Stopped
    from kandinsky_train.preemption import finishing

    stop = StopRequest()
    stop.training_ended("Training reached step 8; the last checkpoint is checkpoint-8.")
    finishing("the final save")
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.exit_code == 143
    assert str(stopped.value) == (
        "received SIGTERM during the final save. Training reached step 8; the last checkpoint is checkpoint-8. Not "
        "finished: the final save and what follows it; run the same command with --resume_from_checkpoint latest "
        "to redo them.")
