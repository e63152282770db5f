# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Counting the bytes of tensor storage a piece of code keeps alive, and their peak (--estimate_memory, and the
tests that check its figures against real runs): a dispatch mode sees every storage an operator returns, counts it
from its first appearance until it is freed, and labels what it knows (weights, gradients, optimizer states...)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The CUDA caching allocator hands out blocks in multiples of 512 bytes, and max_memory_allocated counts blocks.
BLOCK = 512
OTHER = "activations and temporaries"
AUTOCAST = "half-precision weight copies"
HALF = (torch.float16, torch.bfloat16)


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages of the tensors that operators return (and of those `add` is given).
    fake_only: count fake tensors only (the estimate's stand-in for the GPU); else every tensor (a real CPU run).
    A storage `to_host` moved is not counted until `to_device` brings it back (--offload_ema)."""

    def __init__(self, fake_only=True):
        super().__init__()
        self.fake_only = fake_only
        self.live = self.peak = 0
        self.sizes = {}  # serial -> bytes, of the storages alive
        self.at_peak = {}  # the same at the peak
        self.labels = {}  # serial -> part
        self.host = set()  # serials off the device
        self._serial = {}  # id(storage) -> serial, while the storage lives
        self._refs = {}
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(out)
        if func is torch.ops.aten._to_copy.default and out.dtype in HALF and self._is_weight(args[0]):
            self.label(out, AUTOCAST)  # autocast's copy of a trained weight (its cache, and what backward keeps)
        return out

    def _is_weight(self, t):
        serial = self._serial.get(id(t.untyped_storage())) if self._counted(t) else None
        return self.labels.get(serial) == "weights"

    def _counted(self, t):
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return False
        from torch._subclasses.fake_tensor import FakeTensor

        return isinstance(t, FakeTensor) or not self.fake_only

    def serials(self, tensors):
        """Register the storages of every tensor in `tensors` (any nesting); their serials."""
        found = []
        for t in tree_flatten(tensors)[0]:
            if not self._counted(t):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self._serial:
                serial, size = self._next, -(-storage.nbytes() // BLOCK) * BLOCK
                self._next += 1
                self._serial[key], self.sizes[serial] = serial, size
                self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
                self.live += size
                if self.live > self.peak:
                    self.peak, self.at_peak = self.live, dict(self.sizes)
            found.append(self._serial[key])
        return found

    add = serials

    def _freed(self, key):
        serial = self._serial.pop(key)
        self._refs.pop(key)
        size = self.sizes.pop(serial)
        if serial in self.host:
            self.host.discard(serial)
        else:
            self.live -= size

    def label(self, tensors, part):
        for serial in self.serials(tensors):
            self.labels.setdefault(serial, part)

    def to_host(self, tensors):
        for serial in self.serials(tensors):
            if serial not in self.host:
                self.host.add(serial)
                self.live -= self.sizes[serial]

    def to_device(self, tensors):
        for serial in self.serials(tensors):
            if serial in self.host:
                self.host.discard(serial)
                self.live += self.sizes[serial]
                if self.live > self.peak:
                    self.peak, self.at_peak = self.live, dict(self.sizes)

    def parts_at_peak(self):
        """{part: bytes} of what was alive at the peak (storages off the device left out)."""
        parts = {}
        for serial, size in self.at_peak.items():
            if serial not in self.host:
                part = self.labels.get(serial, OTHER)
                parts[part] = parts.get(part, 0) + size
        return parts


def state_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


class AdamW8bitLayout(torch.optim.Optimizer):
    """Stands in for bitsandbytes' AdamW8bit, whose kernels cannot run on fake tensors: it allocates the states that
    bitsandbytes keeps (its blockwise 8-bit layout: two uint8 moments and one fp32 absmax per 256 weights for each,
    fp32 moments for tensors under 4096 weights) and changes no weight. bitsandbytes updates in place, with no
    temporaries of a weight's size."""

    NOTE = ("8-bit AdamW states counted from bitsandbytes' layout (it cannot run on fake tensors): 2 bytes a weight "
            "plus 8 bytes per 256 weights, fp32 moments for tensors under 4096 weights")
    MIN_8BIT_SIZE, BLOCK = 4096, 256

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                state = self.state[p]
                if p.numel() < self.MIN_8BIT_SIZE:
                    state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                    state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    continue
                blocks = -(-p.numel() // self.BLOCK)
                for moment in ("1", "2"):
                    state["state" + moment] = torch.zeros_like(p, dtype=torch.uint8)
                    state["absmax" + moment] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


class ProdigyLayout(torch.optim.Optimizer):
    """Stands in for Prodigy, which reads values as it steps (whether a weight is all zeros, its step-size
    estimate): the states it keeps at slice_p 1 (the scripts' setting), each of the weight's size and dtype: the
    initial weight, its running sum s, and the two Adam moments."""

    NOTE = ("Prodigy's states counted from its layout (it reads values as it steps, which fake tensors hold none "
            "of): 4 tensors of each weight's size")

    def __init__(self, params, beta1):
        super().__init__(params, {})
        self.names = ("p0", "s", "exp_avg", "exp_avg_sq") if beta1 > 0 else ("p0", "s", "exp_avg_sq")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p]:
                    self.state[p].update({name: torch.zeros_like(p) for name in self.names})


# Optimizers that cannot run on fake tensors, counted by a stand-in that allocates their states: (whether the run
# uses it, factory(params, args), note for the output). Any other optimizer is the real one, stepped on fake tensors.
STATE_LAYOUTS = [
    (lambda args: args.use_8bit_adam, lambda params, args: AdamW8bitLayout(params), AdamW8bitLayout.NOTE),
    (lambda args: args.optimizer == "prodigy", lambda params, args: ProdigyLayout(params, args.adam_beta1),
     ProdigyLayout.NOTE),
]


def counted_optimizer(args, params):
    """The run's optimizer as the estimate steps it, and a note when its states are counted from a layout. The
    real one is made for a CUDA device (fused AdamW, as the GPU run uses: no temporaries of the weights' size)."""
    from .runtime import make_optimizer

    for used, layout, note in STATE_LAYOUTS:
        if used(args):
            return layout(params, args), note
    return make_optimizer(args, params, torch.device("cuda")), None
