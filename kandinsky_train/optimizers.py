# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The optimizers that keep less state than AdamW's two fp32 moments (8 bytes a weight): Adafactor factored over a
convolution's output channels and everything else, and torchao's 4-bit AdamW. Both step each weight tensor on its
own, as --fused_backward_pass and --full_bf16 need (memory.py)."""

import contextlib
import logging

import torch

from . import faults

logger = logging.getLogger(__name__)


def factored_adafactor():
    """The class of transformers' Adafactor that factors a convolution weight (out, in, kh, kw) as the matrix
    (out, in * kh * kw). transformers factors over a tensor's last two dimensions, which for a 3x3 convolution are
    the kernel's: its row and column moments then take (out, in, 3) values each, 2.7 bytes a weight, more than 8-bit
    AdamW. As a matrix the moments take out + in * kh * kw values, as Adafactor's paper factors any weight (what
    the official Kandinsky 2.1 training's Adafactor would have needed for its memory to be small)."""
    from transformers.optimization import Adafactor

    class ConvFactoredAdafactor(Adafactor):
        @torch.no_grad()
        def step(self, closure=None):
            flat = {}  # id of a weight of more than 2 dimensions: (weight, its matrix view)
            for group in self.param_groups:
                for i, p in enumerate(group["params"]):
                    if p.grad is not None and p.dim() > 2:
                        matrix = p.detach().reshape(p.shape[0], -1)  # a view, unless the weight is channels-last
                        matrix.grad = p.grad.reshape(matrix.shape)
                        if p in self.state:
                            self.state[matrix] = refactored(self.state.pop(p), matrix.shape)
                        flat[id(matrix)] = (p, matrix)
                        group["params"][i] = matrix
            try:
                return super().step(closure)
            finally:
                for group in self.param_groups:
                    for i, matrix in enumerate(group["params"]):
                        if id(matrix) in flat:
                            p, _ = flat[id(matrix)]
                            if not p.is_contiguous():  # the matrix was a copy: the update goes back into the weight
                                p.copy_(matrix.view(p.shape))
                            if matrix in self.state:
                                self.state[p] = self.state.pop(matrix)
                            group["params"][i] = p

    return ConvFactoredAdafactor


def refactored(state, shape):
    """A weight's Adafactor state for its matrix of `shape`. A checkpoint written before this factoring (by
    transformers' Adafactor: rows and columns over the kernel's two dimensions) resumes with the second moment that
    those factors stand for, factored anew: V = row / mean(row) x col, as Adafactor's own update reads it."""
    row = state.get("exp_avg_sq_row")
    if row is None or row.shape == shape[:1]:
        return state
    moment = (row / row.mean(-1, keepdim=True)).unsqueeze(-1) * state["exp_avg_sq_col"].unsqueeze(-2)
    logger.info(f"Adafactor state of a {tuple(moment.shape)} weight factored anew as the matrix {tuple(shape)}.")
    moment = moment.reshape(shape)
    return {**state, "exp_avg_sq_row": moment.mean(-1), "exp_avg_sq_col": moment.mean(0)}


def adamw_4bit():
    """torchao's AdamW4bit: both moments in 4 bits, a scale per 128 values (about 1.06 bytes a weight; tensors under
    4096 values keep fp32 moments). Its step is compiled with torch.compile per weight shape; the test hook of
    --torch_compile's backend (faults.py) runs it eagerly instead, as Inductor's C++ builds take a minute on a small
    CPU. Its states are tensor subclasses: torch.load's safe mode (accelerate's resume) is told about them."""
    from torchao.optim import AdamW4bit
    from torchao.optim.subclass_4bit import OptimState4bit

    torch.serialization.add_safe_globals([OptimState4bit])

    class AdamW4bitStepped(AdamW4bit):
        @torch.no_grad()
        def step(self, closure=None):
            eager = faults.compile_backend() != "inductor"
            with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                return super().step(closure)

    return AdamW4bitStepped


def state_bytes(optimizer_name, shapes, use_8bit_adam=False):
    """The bytes of an optimizer's states after its first step, for weights of these shapes, from the libraries'
    layouts (no tensor is made): AdamW two fp32 moments; bitsandbytes' 8-bit AdamW two uint8 moments and a fp32
    absmax per 256 values (and a code book) for tensors of at least 4096 values (smaller ones fp32); torchao's
    4-bit AdamW two 4-bit moments and a fp32 scale per 128 values (same threshold, and only for multiples of 128);
    Adafactor a row and a column fp32 moment for a matrix, as factored here (its weights of more than 2 dimensions
    as matrices), a full fp32 one for a vector; Prodigy four fp32 copies (two moments, its sum s and the starting
    weights p0)."""
    total = 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        if optimizer_name == "adafactor":
            total += 4 * (shape[0] + n // shape[0]) if len(shape) >= 2 else 4 * n
        elif optimizer_name == "prodigy":
            total += 16 * n
        elif use_8bit_adam and n >= 4096:
            total += 2 * (n + 4 * -(-n // 256) + 4 * 256)  # and a 256-value fp32 code book
        elif optimizer_name == "adamw4bit" and n >= 4096 and n % 128 == 0:
            total += 2 * (n // 2 + 4 * (n // 128))
        else:
            total += 8 * n
    return total
