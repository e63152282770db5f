"""In-process stand-ins for the pieces of accelerate the package's modules call, so that unit tests can exercise a
module without starting a training run."""

import contextlib
import os

import torch


class FakeAccelerator:
    """One process on the CPU: save_state writes a marker file, barriers do nothing, the model is its own unwrap."""

    def __init__(self, process_index=0, num_processes=1):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = self.is_local_main_process = process_index == 0
        self.device = torch.device("cpu")
        self.saved, self.printed, self.logged = [], [], []
        self.save_hooks, self.load_hooks = [], []
        self.trackers = []

    def wait_for_everyone(self):
        pass

    @contextlib.contextmanager
    def main_process_first(self):
        yield

    def save_state(self, folder):
        fake_reference_checkpoint(folder, "prior")  # placeholders of what accelerate and the model hooks write
        self.saved.append(folder)

    def unwrap_model(self, model):
        return model

    def register_save_state_pre_hook(self, hook):
        self.save_hooks.append(hook)

    def register_load_state_pre_hook(self, hook):
        self.load_hooks.append(hook)

    def reduce(self, tensor, reduction):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))

    def log(self, values, step):
        self.logged.append((step, values))


def fake_reference_checkpoint(path, sub, ema=False, leave_out=()):
    """The files a checkpoint of diffusers' reference scripts holds (placeholders: only their presence is looked at
    by the code under test): accelerate's optimizer.bin, scheduler.bin, random_states_0.pkl, the model in SUB/ and
    with `ema` its EMA in SUB_ema/, no training_state.json. `leave_out`: names not to write."""
    files = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", f"{sub}/config.json",
             f"{sub}/diffusion_pytorch_model.safetensors"]
    if ema:
        files += [f"{sub}_ema/config.json", f"{sub}_ema/diffusion_pytorch_model.safetensors"]
    for name in files:
        if name not in leave_out and name.split("/")[0] + "/" not in leave_out:
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as f:
                f.write(b"{}")
    return path


def fake_checkpoint(path, sub, step, leave_out=()):
    """One of ours: the reference layout above (less `leave_out`) and training_state.json."""
    fake_reference_checkpoint(path, sub, leave_out=leave_out)
    with open(os.path.join(path, "training_state.json"), "w") as f:
        f.write('{"global_step": %d}' % step)
    return path
