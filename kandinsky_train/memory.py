# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The dtypes the trained model's weights keep, and the memory levers: --fused_backward_pass (the optimizer steps each
weight inside the backward pass and frees its gradient, so the gradients of the whole model never exist at once) and
--full_bf16 (the trained weights in bf16, without an fp32 master copy; each update is computed in fp32 and rounded
stochastically into the bf16 weight).

Both levers step the optimizer one weight tensor at a time. That is exact for optimizers whose update of a weight
depends on that weight's gradient and state alone (AdamW, 8-bit and 4-bit AdamW, Adafactor); checks.py refuses the
others."""

import contextlib

import torch

from .diffusion import step_seed


def set_weight_dtypes(args, model, params, half_dtype):
    """--full_bf16: the trained weights (params) become bf16. And the frozen linear and convolution weights of the
    model (the base under LoRA adapters) take the mixed-precision half dtype: autocast casts fp32 weights to it in
    every forward pass, and caches the copy only for weights that require grad, so a frozen fp32 base would be
    copied at each step. Cast once, the math is the same (autocast rounds alike), in half the memory. Norm layers
    keep fp32, as autocast computes them in fp32."""
    if args.full_bf16:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    cast_frozen_layers(model, half_dtype)


def cast_frozen_layers(model, dtype):
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(dtype)


def round_stochastically(values, generator):
    """fp32 -> bf16, rounding up or down with the probabilities that make the result's mean the fp32 value: random
    bits are added below bf16's 16 bits of precision before they are cut off. An update smaller than half a bf16
    step then moves the weight now and then instead of never."""
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    # Integer addition carries into the exponent where it should: a float's bits count up like its magnitude.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class OptimizerUpdate:
    """The optimizer step at the end of each accumulation: the plain one (clip the total gradient norm, step, zero
    the gradients), or, with a lever, one weight tensor at a time. `step()` returns the total gradient norm before
    clipping (what clip_grad_norm_ returns), or None without --max_grad_norm."""

    def __init__(self, args, accelerator, optimizer, params, state):
        """optimizer: the accelerate-prepared one; state: the run's TrainState (seed and step of the rounding)."""
        self.accelerator, self.optimizer, self.params, self.state = accelerator, optimizer, params, state
        self.max_grad_norm, self.fused, self.full_bf16 = args.max_grad_norm, args.fused_backward_pass, args.full_bf16
        self.torch_optimizer = optimizer.optimizer  # below accelerate's wrapper, which steps every weight at once
        group_of = {id(p): g for g, group in enumerate(self.torch_optimizer.param_groups) for p in group["params"]}
        self.place = {id(p): (i, group_of[id(p)]) for i, p in enumerate(params)}
        self.generator = torch.Generator(device=accelerator.device)
        self.norms = []
        if self.full_bf16:
            keep_state_dtypes(self.torch_optimizer)
        if self.fused:
            for p in params:
                p.register_post_accumulate_grad_hook(self._step_in_backward)

    def step(self):
        if self.fused:  # the weights were stepped in the backward pass
            norms, self.norms = self.norms, []
            return torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        norm = None
        if self.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.full_bf16:
            for p in self.params:
                if p.grad is not None:
                    self._step_tensor(p)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _step_in_backward(self, p):
        """--fused_backward_pass: called once the micro-batch's gradient of p is accumulated. The gradient keeps
        accumulating until the last micro-batch of the optimizer step, then p is clipped on its own, stepped and its
        gradient freed."""
        if not self.accelerator.sync_gradients:
            return
        self._step_tensor(p, clip=self.max_grad_norm > 0)

    def _step_tensor(self, p, clip=False):
        """Step the optimizer on p alone (clipping p's gradient to --max_grad_norm on its own first, if asked)."""
        index, group_index = self.place[id(p)]
        group = self.torch_optimizer.param_groups[group_index]  # looked up now: load_state_dict replaces groups
        with self._stepped(p, index) as stepped:
            if clip:
                self.norms.append(torch.nn.utils.clip_grad_norm_(stepped, self.max_grad_norm))
            others, group["params"] = group["params"], [stepped]
            try:
                self.torch_optimizer.step()
            finally:
                group["params"] = others
        p.grad = None

    @contextlib.contextmanager
    def _stepped(self, p, index):
        """The tensor the optimizer steps for p: p itself, or with --full_bf16 an fp32 copy of it, which takes p's
        optimizer state (so the states are fp32 too) and is then rounded stochastically into p. The random bits are
        a function of seed, step and tensor: a resumed run and every process draw the same. (p itself keeps its
        dtype: changing it would drop the gradient hooks that DDP's all-reduce hangs on.)"""
        if not self.full_bf16:
            yield p
            return
        state = self.torch_optimizer.state
        copy = p.detach().float()
        copy.grad = p.grad.float()
        if p in state:
            state[copy] = state.pop(p)
        yield copy
        state[p] = state.pop(copy)
        self.generator.manual_seed(step_seed(self.state.seed, "rounding", self.state.global_step, index))
        with torch.no_grad():
            p.copy_(round_stochastically(copy, self.generator))


def keep_state_dtypes(optimizer):
    """torch's Optimizer.load_state_dict casts every floating state tensor to its weight's dtype: with --full_bf16
    that would round the fp32 moments to bf16 at each resume. The saved tensors are put back as they were saved."""
    saved = {}

    def remember(optimizer, state_dict):
        saved["state_dict"] = state_dict

    def restore(optimizer):
        state_dict = saved.pop("state_dict")
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                loaded = optimizer.state[p].get(key)
                if torch.is_tensor(value) and torch.is_tensor(loaded) and value.dtype != loaded.dtype:
                    optimizer.state[p][key] = value.to(loaded.device)

    optimizer.register_load_state_dict_pre_hook(remember)
    optimizer.register_load_state_dict_post_hook(restore)
