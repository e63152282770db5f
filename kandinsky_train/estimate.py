# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--estimate_memory: the peak device memory a command would reach, counted without a GPU and without a weight.

The script's own code builds its models from their configuration files alone, on fake tensors
(torch._subclasses.fake_tensor.FakeTensorMode: shapes and dtypes, no data), and runs the stage's real code for two
optimizer steps (the second one's micro-batches meet the first one's optimizer states): the frozen encoders, the
trained model's forward under autocast and backward, the optimizer step (memory.OptimizerUpdate, with the fused
pass and --full_bf16), the EMA. live_bytes.LiveBytes counts the bytes of every storage alive after each operator.
Fake tensors live on the CPU device, so autocast follows CPU autocast's lists (half precision for convolutions,
matrix products and attention, as on CUDA) and attention takes a memory-efficient kernel, as PyTorch's does on a GPU.
Not counted: the CUDA context and cuBLAS/cuDNN workspaces (outside torch's allocator statistics), allocator
fragmentation, validation and the held-out evaluation."""

import contextlib
import os
from types import SimpleNamespace

import torch

from . import checks
from .cache import at_batch_size, encode_all, encoding_batch_size, frozen_parts
from .checkpoint_folders import mixed_precision
from .ema import make_ema, ema_step
from .errors import fail
from .live_bytes import AUTOCAST, OTHER, LiveBytes, counted_optimizer, state_tensors
from .memory import OptimizerUpdate, set_weight_dtypes

GiB = 2 ** 30
PARTS = ("weights", AUTOCAST, "gradients", "optimizer states", "EMA", "frozen models", OTHER)
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
GPU = torch.device("cuda")  # the device planned for: its batch sizes (the frozen encoders')
STEPS = 2  # optimizer steps run: the second one's forward and backward carry the first one's optimizer states


class PlannedAccelerator:
    """What the stage code asks of the Accelerator, for the run being planned: one process, its mixed precision, the
    device (fake tensors on the CPU stand in for it). Not the main process: the main process's extras (the
    validation prompts' embeddings, the validation decoder) are neither loaded nor counted."""

    num_processes, process_index, is_main_process, is_local_main_process = 1, 0, False, False

    def __init__(self, args):
        self.device = torch.device("cpu")
        self.mixed_precision = mixed_precision(args)
        self.gradient_accumulation_steps = args.gradient_accumulation_steps
        self.sync_gradients = True

    def autocast(self):
        half = HALF.get(self.mixed_precision)
        return torch.autocast("cpu", dtype=half) if half else contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model):
        return model


class _PreparedOptimizer:
    """accelerate's optimizer wrapper, as memory.OptimizerUpdate uses it."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class _Tokens:
    """The CLIP tokenizer's output shape (model_max_length ids), so that no tokenizer file is needed."""

    model_max_length = 77

    def __call__(self, captions, max_length=77, **kwargs):
        ids = torch.zeros(len(captions), max_length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def __len__(self):
        return 49408


@contextlib.contextmanager
def config_only():
    """The models' from_pretrained builds them from their configuration file, random and fake, reading no weight."""
    from unittest import mock

    from diffusers import ModelMixin
    from transformers import CLIPTokenizer, PreTrainedModel

    def diffusers_model(cls, path, subfolder=None, torch_dtype=None, cache_dir=None, **kwargs):
        model = cls.from_config(cls.load_config(path, subfolder=subfolder, cache_dir=cache_dir))
        return torch.nn.Module.to(model, torch_dtype) if torch_dtype else model  # (diffusers' own .to warns)

    def transformers_model(cls, path, subfolder="", torch_dtype=None, cache_dir=None, **kwargs):
        config = cls.config_class.from_pretrained(path, subfolder=subfolder, cache_dir=cache_dir)
        model = cls._from_config(config)
        return model.to(torch_dtype) if torch_dtype else model

    with mock.patch.object(ModelMixin, "from_pretrained", classmethod(diffusers_model)), \
            mock.patch.object(PreTrainedModel, "from_pretrained", classmethod(transformers_model)), \
            mock.patch.object(CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: _Tokens())):
        yield


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # The converter's memo keeps a weak reference to each fake tensor, and nn.Module.to swaps a fake parameter's
    # tensor, which a weak reference forbids. The memo only maps real tensors to their fake twins: not needed here.
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    return mode


def model_tensors(*models):
    return [t for m in models for t in (*m.parameters(), *m.buffers())]


def micro_batch(args, stage, mode):
    """One micro-batch as the data loader gives it: train_batch_size samples of a grey picture at --resolution
    (and a caption, and the decoder's paired pictures), made by the stage's own make_sample, as fake tensors."""
    from PIL import Image
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        image = Image.new("RGB", (args.resolution, args.resolution), (128, 128, 128))
        row = {column: "a photo" if stage.name == "prior" else image for column in stage.columns}
        sample = stage.make_sample(image, row, 0, None)
        batch = torch.utils.data.default_collate([sample] * args.train_batch_size)
    return {key: mode.from_tensor(value) for key, value in batch.items()}


def count(args, build_stage):
    """{"caching": (peak, parts) or None, "training": (peak, parts), "notes": [...]}: the counted peaks in bytes."""
    accelerator = PlannedAccelerator(args)
    mode = fake_mode()
    with mode, config_only():
        stage = build_stage(accelerator)
        parts = frozen_parts(stage)
        frozen = [m for part in parts for m in part.models]
        encode = at_batch_size(encode_all(parts), encoding_batch_size(GPU, args.train_batch_size))
        caching, cached = None, None
        if args.cache_embeddings:  # before training: a pass over the data per part, its models alone on the device
            passes = [caching_pass(args, stage, mode, part) for part in parts]
            caching = max((figures for figures, _ in passes), key=lambda figures: figures[0])
            cached = {key: value for _, outputs in passes for key, value in outputs.items()}
        training, notes = count_training(args, accelerator, stage, mode, None if cached else encode, cached, frozen)
    return {"caching": caching, "training": training, "notes": notes}


def caching_pass(args, stage, mode, part):
    """((peak, parts), outputs) of one part's caching pass (cache.frozen_outputs): its models on the device, a
    micro-batch and what they make of it."""
    tracker = LiveBytes()
    tracker.label(model_tensors(*part.models), "frozen models")
    with tracker, torch.no_grad():
        batch = micro_batch(args, stage, mode)
        tracker.add(batch)
        encode = at_batch_size(part.encode, encoding_batch_size(GPU, args.train_batch_size))
        outputs = {k: v.contiguous() for k, v in encode(batch).items()}
        del batch
    return (tracker.peak, tracker.parts_at_peak()), outputs


def count_training(args, accelerator, stage, mode, encode, cached, frozen):
    """The training phase's peak over STEPS optimizer steps: the first of one micro-batch (it makes the optimizer
    states), the second of min(accumulation, 2), whose second micro-batch runs with the first one's gradients (later
    ones repeat its memory)."""
    tracker = LiveBytes()
    model = stage.model
    params = [p for p in model.parameters() if p.requires_grad]
    set_weight_dtypes(args, model, params, HALF.get(accelerator.mixed_precision))
    tracker.label(params, "weights")
    tracker.label(model_tensors(model), "frozen models")  # a LoRA base and the buffers
    if encode is not None:
        tracker.label(model_tensors(*frozen), "frozen models")
    with tracker:
        for p in params:  # before OptimizerUpdate's hooks, which free the gradient in the fused pass
            p.register_post_accumulate_grad_hook(lambda p: tracker.label(p.grad, "gradients"))
        optimizer, note = counted_optimizer(args, params)
        ema = make_ema(args, model, accelerator.device)
        if ema is not None:
            tracker.label(ema.shadow_params, "EMA")
            if args.offload_ema:
                tracker.to_host(ema.shadow_params)
        prepare_forward(model, accelerator)
        update = OptimizerUpdate(args, accelerator, _PreparedOptimizer(optimizer),
                                 params, SimpleNamespace(seed=0, global_step=0))
        generator = torch.Generator()
        for step in range(STEPS):
            micro_batches = 1 if step == 0 else min(args.gradient_accumulation_steps, 2)
            for micro in range(micro_batches):
                accelerator.sync_gradients = micro == micro_batches - 1
                batch = micro_batch(args, stage, mode) if encode is not None else dict(cached)
                tracker.add(batch)
                if encode is not None:
                    with torch.no_grad():
                        batch = {k: v.contiguous() for k, v in encode(batch).items()}
                loss = stage.loss(model, batch, generator)
                (loss / args.gradient_accumulation_steps).backward()
                del loss, batch
                if accelerator.sync_gradients:
                    update.step()
            tracker.label(state_tensors(optimizer), "optimizer states")
            if ema is not None:
                tracker.to_device(ema.shadow_params)  # --offload_ema: on the device for the update
                ema_step(ema, model, args, accelerator.device)
                tracker.label(ema.shadow_params, "EMA")
                if args.offload_ema:
                    tracker.to_host(ema.shadow_params)
    return (tracker.peak, tracker.parts_at_peak()), [note] if note else []


def prepare_forward(model, accelerator):
    """What accelerator.prepare does to the model's forward under mixed precision: autocast, outputs to fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    if accelerator.mixed_precision in HALF:
        forward = model.forward
        model.forward = convert_outputs_to_fp32(lambda *a, **k: _autocast_call(accelerator, forward, a, k))


def _autocast_call(accelerator, forward, args, kwargs):
    with accelerator.autocast():
        return forward(*args, **kwargs)


def peak_of(figures):
    return max(figures["training"][0], figures["caching"][0] if figures["caching"] else 0)


def report(args, figures, stage_name):
    """The table by part, the notes, then the peak line last."""
    lines = [f"Memory estimate for this {stage_name} command (counted on fake tensors at the models' real sizes; "
             f"precision {mixed_precision(args)}, batch {args.train_batch_size}"
             + (f", {args.resolution} px" if stage_name == "decoder" else "") + "):"]
    phases = [("training", figures["training"])]
    if figures["caching"]:
        phases.insert(0, ("caching (--cache_embeddings, before training)", figures["caching"]))
    for name, (peak, parts) in phases:
        lines.append(f"  {name} phase, at its peak:")
        for part in PARTS:
            if parts.get(part):
                lines.append(f"    {part:<30} {parts[part] / GiB:8.2f} GiB")
        lines.append(f"    {'total':<30} {peak / GiB:8.2f} GiB")
    lines += [f"  note: {note}" for note in figures["notes"]]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        lines.append("  note: counted for one process; DistributedDataParallel adds buckets as large as the gradients")
    if mixed_precision(args) == "fp16":
        lines.append("  note: fp16's loss scaling unscales the gradients in place (no memory counted for it)")
    return lines


def main(args, stage_name, build_stage):
    """Print the estimate of the command `args`; return the peak in bytes. build_stage(accelerator) -> the
    script's Stage."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    checks.check_estimate_args(args, stage_name)
    try:
        figures = count(args, build_stage)
    except DataDependentOutputException:  # code that reads a tensor's values (an optimizer without a layout)
        fail("--estimate_memory cannot count this command: a part of its step reads tensor values, which fake tensors "
             f"do not hold (--optimizer {args.optimizer} needs a state layout in kandinsky_train/live_bytes.py).")
    for line in report(args, figures, stage_name):
        print(line)
    from .estimate_advice import advise

    for line in advise(args, figures, lambda changed: peak_of(count(changed, build_stage)), stage_name):
        print(line)
    print(f"Estimated peak device memory: {peak_of(figures) / GiB:.2f} GiB")
    return peak_of(figures)
