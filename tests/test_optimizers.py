"""Optimizers with small states (issue 30): bitsandbytes' 8-bit AdamW and torchao's 4-bit AdamW train, checkpoint
their low-bit states and resume exactly, also stepped in the backward pass with bf16 weights; Adafactor factors a
convolution weight as a matrix; the states' sizes on the real decoder UNet, counted from its configuration."""

import json

import pytest
import torch

from kandinsky_train.optimizers import factored_adafactor, state_bytes

from conftest import PRIOR_SCRIPT, REPO, base_args, launch, offline_env
from test_memory import BF16, stopped_at, weights
from test_robustness import assert_same_state, state_of

GIB = 2 ** 30


def flat(value):
    """An optimizer state's slot as plain tensors: torchao's 4-bit moments as their codes and scales (torch.equal
    does not take them), bitsandbytes' dict of quantized states as its tensors."""
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in flat(value[key])]
    if hasattr(value, "codes"):
        return [value.codes, value.scale]
    return [torch.as_tensor(value)]


def plain_states(state):
    for slots in state["optimizer"].values():
        for slot, value in slots.items():
            slots[slot] = torch.cat([t.reshape(-1).double() for t in flat(value)])
    return state


# torchao compiles its 4-bit step with Inductor, whose C++ builds take a minute on a small CPU: eagerly here.
EAGER_STEP = offline_env(KANDINSKY_TRAIN_COMPILE_BACKEND="aot_eager")


def low_bit_run(tiny, tmp_path, flags, launcher=None):
    """The prior for 4 steps with a checkpoint at step 2, and a run stopped there and resumed: returns the
    uninterrupted run's final optimizer states, having checked that the resumed one ends with exactly the same
    state."""
    flags = {**flags, "--checkpointing_steps": 2, "--use_ema": True}
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "whole", **flags), launcher=launcher, env=EAGER_STEP)
    stopped_at(tmp_path / "whole", 2, tmp_path / "parts")
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "parts", **flags, **{"--resume_from_checkpoint": "latest"}),
           launcher=launcher, env=EAGER_STEP)
    whole = state_of(tmp_path / "whole/checkpoint-4", "prior")
    start = weights(tiny["prior"], "prior")
    assert any(not torch.equal(start[k].to(t.dtype), t) for k, t in whole["model"].items())  # it trained
    raw = [t for slots in whole["optimizer"].values() for slot in slots.values()
           for t in (slot.values() if isinstance(slot, dict) else [slot])]
    assert_same_state(plain_states(whole), plain_states(state_of(tmp_path / "parts/checkpoint-4", "prior")),
                      ema=True)
    return raw


@pytest.mark.parametrize("levers", [{}, {"--fused_backward_pass": True, "--full_bf16": True,
                                         "--mixed_precision": "bf16"}], ids=["plain", "fused-bf16"])
def test_8bit_adam_trains_checkpoints_and_resumes_exactly(tiny, tmp_path, levers):
    """--use_8bit_adam (bitsandbytes, on the CPU), alone and stepped in the backward pass with bf16 weights: the
    checkpoint holds 8-bit moments for the prior's large tensors, and the resumed run ends bit-identical."""
    raw = low_bit_run(tiny, tmp_path, {"--use_8bit_adam": True, **levers}, launcher=BF16 if levers else None)
    assert any(torch.is_tensor(t) and t.dtype == torch.uint8 for t in raw)


def test_4bit_adamw_trains_as_the_fused_pass_and_resumes_exactly(tiny, tmp_path):
    """--optimizer adamw4bit (torchao): stepped in the backward pass it gives the plain step's weights (it updates
    each tensor on its own); the checkpoint holds 4-bit moments; stopped and resumed, the same state."""
    flags = {"--optimizer": "adamw4bit", "--max_grad_norm": 1e9}
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "plain", **flags), env=EAGER_STEP)
    raw = low_bit_run(tiny, tmp_path, {**flags, "--fused_backward_pass": True})
    assert any(type(t).__name__ == "OptimState4bit" for t in raw)
    plain, fused = weights(tmp_path / "plain", "prior"), weights(tmp_path / "whole/checkpoint-4", "prior")
    for name, tensor in plain.items():
        torch.testing.assert_close(fused[name], tensor, rtol=0, atol=1e-7)


def test_adafactor_factors_a_convolution_as_a_matrix():
    """A 3x3 convolution weight (out, in, 3, 3) keeps a row moment of `out` values and a column one of in * 9, and
    takes the step transformers' Adafactor takes on the weight reshaped as that matrix; a matrix and a vector take
    transformers' own step."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8, 6), (8,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().reshape(p.shape[0], -1).clone()) for p in ours]
    options = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=0.01)
    optimizers = factored_adafactor()(ours, **options), Adafactor(theirs, **options)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.reshape(b.shape).clone()
        for optimizer in optimizers:
            optimizer.step()
    state = optimizers[0].state[ours[0]]
    assert state["exp_avg_sq_row"].shape == (8,) and state["exp_avg_sq_col"].shape == (36,)
    for a, b in zip(ours, theirs):
        assert a.shape in map(torch.Size, shapes)
        torch.testing.assert_close(a.detach().reshape(b.shape), b.detach(), rtol=0, atol=0)


def test_state_sizes_on_the_real_decoder_unet():
    """The states after the first step for every weight of Kandinsky 2.2's decoder UNet (built on the meta device
    from benchmarks/configs): factored Adafactor is the smallest by far, then 4-bit, then 8-bit AdamW, then AdamW's
    8 bytes a weight."""
    from diffusers import UNet2DConditionModel

    config = json.loads((REPO / "benchmarks/configs/decoder/unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes = [p.shape for p in unet.parameters()]
    n = sum(s.numel() for s in shapes)
    sizes = {name: state_bytes(name, shapes, use_8bit_adam=name == "8bit") / GIB
             for name in ("adamw", "8bit", "adamw4bit", "adafactor")}
    assert 1.2e9 < n < 1.3e9
    assert sizes["adamw"] == pytest.approx(8 * n / GIB)
    assert 2.2 < sizes["8bit"] < 2.4 and 1.1 < sizes["adamw4bit"] < 1.3 and sizes["adafactor"] < 0.01, sizes


def test_adafactor_resumes_a_state_factored_over_the_kernel():
    """A checkpoint of an Adafactor run from before this factoring (transformers': rows and columns over a
    convolution's kernel) loads and steps on: its second moment is factored anew as the matrix's, the one that
    the old factors stand for when they are exact (a moment of rank one)."""
    from transformers.optimization import Adafactor

    options = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    weight = torch.nn.Parameter(torch.ones(4, 3, 3, 3))
    old = Adafactor([weight], **options)
    # a gradient that is a product of one factor per dimension: both factorings of its square are exact
    weight.grad = (torch.arange(1.0, 5.0).view(4, 1, 1, 1) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)
                   * torch.tensor([1.0, 0.5, 2.0]).view(1, 1, 3, 1) * torch.tensor([3.0, 1.0, 0.25]).view(1, 1, 1, 3))
    old.step()
    ours = factored_adafactor()([weight], **options)
    ours.load_state_dict(old.state_dict())
    weight.grad = weight.grad.clone()
    ours.step()
    state = ours.state[weight]
    assert state["exp_avg_sq_row"].shape == (4,) and state["exp_avg_sq_col"].shape == (27,)
    fresh = factored_adafactor()([torch.nn.Parameter(torch.ones(4, 3, 3, 3))], **options)
    again = next(iter(fresh.param_groups[0]["params"]))
    again.grad = weight.grad.clone()
    fresh.step()
    again.grad = weight.grad.clone()
    fresh.step()
    torch.testing.assert_close(weight.detach(), again.detach())
