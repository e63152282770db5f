"""The memory levers (issue 24): --fused_backward_pass steps each weight in the backward pass and must give the plain
step's weights; --full_bf16 keeps bf16 weights and must not round small updates away; both resume exactly."""

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import PriorTransformer
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from PIL import Image
from safetensors.torch import load_file

from kandinsky_train import checks, storage
from kandinsky_train.checkpoint import size_estimate
from kandinsky_train.errors import UserError
from kandinsky_train.memory import OptimizerUpdate, round_stochastically

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch, offline_env
from test_robustness import assert_same_state, error_line, run_in_process, state_of

BF16 = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]


def weights(folder, sub):
    return load_file(next((Path(folder) / sub).glob("*.safetensors")))


def test_stochastic_rounding_is_unbiased():
    below = torch.tensor([1.0, -3.0, 0.0123, 1000.0]).to(torch.bfloat16).float()
    step = torch.tensor([2.0 ** -7, 2.0 ** -6, 2.0 ** -14, 2.0 ** 2])  # the bf16 step (ulp) above each value
    for share in (0.5, 0.1, 0.001):  # 0.1 and 0.001 of a step: nearest rounding never moves
        exact = below + share * step * below.sign()
        rounded = round_stochastically(exact.repeat(200_000, 1), torch.Generator().manual_seed(0))
        assert rounded.dtype == torch.bfloat16
        rounded = rounded.float()
        assert set(rounded.unique().tolist()) <= set(
            below.tolist() + (below + step * below.sign()).tolist())  # only the two neighbours
        error = (rounded.mean(0) - exact) / step
        assert error.abs().max() < 5 * (share * (1 - share) / 200_000) ** 0.5 + 1e-6, (share, error)
    representable = below.repeat(1000, 1)
    assert torch.equal(round_stochastically(representable, torch.Generator()).float(), representable)


def test_fused_backward_pass_frees_each_gradient_in_the_backward_pass():
    """What saves the memory: at no point of the backward pass do more than one layer's gradients exist."""
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    update = OptimizerUpdate(SimpleNamespace(max_grad_norm=1.0, fused_backward_pass=True, full_bf16=False),
                             SimpleNamespace(sync_gradients=True, device=torch.device("cpu")),
                             SimpleNamespace(optimizer=optimizer), params, SimpleNamespace(seed=0, global_step=0))
    alive = []  # gradients that exist each time a weight's gradient is complete (after the fused step's hook)
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    before = [p.detach().clone() for p in params]
    model(torch.randn(4, 8)).pow(2).mean().backward()
    assert len(alive) == len(params) and max(alive) <= 2, alive
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))  # each weight was stepped
    assert update.step() > 0  # the total gradient norm, for the logs


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors made under it that are alive at once (views and in-place results are their
    inputs' storage, not counted again): the gradients and temporaries of a backward pass."""

    def __init__(self):
        super().__init__()
        self.peak, self.made = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                storage = t.untyped_storage()
                self.made.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.made = {key: made for key, made in self.made.items() if not made[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.made.values()))
        return out


def test_fused_backward_pass_frees_gradients_under_torch_compile(tiny, monkeypatch):
    """--torch_compile with --fused_backward_pass compiles the UNet's blocks one by one: the gradients and
    temporaries alive at once in a backward pass stay a small share of the weights' bytes, as without compiling.
    The whole model compiled returns every gradient at once: the measure sees them all."""
    from diffusers import UNet2DConditionModel

    from kandinsky_train import faults
    from kandinsky_train.runtime import compile_model

    monkeypatch.setattr(faults, "_COMPILE_BACKEND", "aot_eager")  # Inductor's C++ builds take minutes here

    def peak_share(regional):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(tiny["decoder"], subfolder="unet")
        params = list(unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        OptimizerUpdate(SimpleNamespace(max_grad_norm=0, fused_backward_pass=True, full_bf16=False),
                        SimpleNamespace(sync_gradients=True, device=torch.device("cpu")),
                        SimpleNamespace(optimizer=optimizer), params, SimpleNamespace(seed=0, global_step=0))
        model = unet if regional is None else compile_model(unet, regional=regional)

        def loss():
            latents = torch.randn(1, unet.config.in_channels, 8, 8)
            added = {"image_embeds": torch.randn(1, unet.config.encoder_hid_dim)}
            return model(latents, torch.tensor([10]), None, added_cond_kwargs=added).sample.pow(2).mean()

        loss().backward()  # compiles the backward too, and makes the optimizer's states
        step = loss()
        tracker = LiveBytes()
        with tracker:
            step.backward()
        assert all(p.grad is None for p in params)
        torch._dynamo.reset()
        return tracker.peak / storage.tensor_bytes(params)

    eager, regional, whole = peak_share(None), peak_share(True), peak_share(False)
    assert 0 < eager < 0.5 and regional < eager + 0.1  # both 0.39 of the weights' bytes (AdamW's temporaries)
    assert whole > 0.9  # how --torch_compile compiled before: 1.05


def stopped_at(run, step, folder):
    """What a run stopped after saving checkpoint-STEP leaves in `folder`: that checkpoint of the uninterrupted `run`
    (one launch less than a run of its own to that step)."""
    shutil.copytree(run / f"checkpoint-{step}", folder / f"checkpoint-{step}")


def test_fused_backward_pass_is_the_plain_step_and_resumes_exactly(tiny, tmp_path):
    """Prior, AdamW, two micro-batches per step (accumulated, then stepped in the last one's backward pass), EMA, a
    --max_grad_norm never reached: the fused pass ends with the plain step's weights, and a run stopped with a
    checkpoint at step 2 and resumed ends with the uninterrupted run's state."""
    common = {"--gradient_accumulation_steps": 2, "--train_batch_size": 1, "--use_ema": True, "--max_grad_norm": 1e9,
              "--checkpointing_steps": 2}
    fused = {**common, "--fused_backward_pass": True}
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "plain", **common))
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "fused", **fused))
    plain, ours = (state_of(tmp_path / run / "checkpoint-4", "prior") for run in ("plain", "fused"))
    start = weights(tiny["prior"], "prior")
    assert any(not torch.equal(start[k], ours["model"][k]) for k in start)
    for key in ("model", "ema"):
        torch.testing.assert_close(ours[key], plain[key], rtol=0, atol=1e-7)
    torch.testing.assert_close(ours["optimizer"], plain["optimizer"], rtol=0, atol=1e-7)  # steps, moments
    for key in ("last_epoch", "_last_lr"):  # the schedule stepped once per optimizer step
        assert ours["scheduler"][key] == plain["scheduler"][key]
    stopped_at(tmp_path / "fused", 2, tmp_path / "parts")
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "parts", **fused, **{"--resume_from_checkpoint": "latest"}))
    assert checkpoints(tmp_path / "parts") == ["checkpoint-2", "checkpoint-4"]
    assert_same_state(state_of(tmp_path / "fused/checkpoint-4", "prior"),
                      state_of(tmp_path / "parts/checkpoint-4", "prior"), ema=True)


def test_fused_backward_pass_of_the_decoder_with_adafactor(tiny, tmp_path):
    """The fused pass gives the plain step's weights; the checkpoint's Adafactor moments of each convolution weight
    (out, in, kh, kw) are a row of `out` values and a column of in * kh * kw (not transformers' (out, in, kh) and
    (out, in, kw), more than 8-bit AdamW keeps)."""
    common = {"--optimizer": "adafactor", "--max_grad_norm": 1e9}
    launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "plain", steps=3, **common, **{"--checkpointing_steps": 3}))
    saved = torch.load(tmp_path / "plain/checkpoint-3/optimizer.bin", weights_only=True)["state"]
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the trained weights' shapes, in the optimizer's order
        shapes = [p.shape for p in UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(tiny["decoder"] / "unet")).parameters()]
    convolutions = [(saved[i], shape) for i, shape in enumerate(shapes) if len(shape) == 4]
    assert len(convolutions) > 10
    for state, (out, *rest) in convolutions:
        assert state["exp_avg_sq_row"].shape == (out,) and state["exp_avg_sq_col"].shape == (math.prod(rest),)
    launch(DECODER_SCRIPT, base_args(tiny, tmp_path / "fused", steps=3, **common, **{"--fused_backward_pass": True}))
    plain, fused = weights(tmp_path / "plain", "unet"), weights(tmp_path / "fused", "unet")
    assert any(not torch.equal(weights(tiny["decoder"], "unet")[k], fused[k]) for k in fused)
    for name, tensor in plain.items():
        torch.testing.assert_close(fused[name], tensor, rtol=0, atol=1e-7)


# Test hook: records each gradient as the backward pass completes it (before the fused step's hook sees it) and the
# gradient each AdamW step is given, then runs the script given.
GRADIENT_SPY = '''
import atexit, os, runpy, sys
import torch

arrived, stepped = [], []
register, step = torch.Tensor.register_post_accumulate_grad_hook, torch.optim.AdamW.step

def recording(self, hook):
    def recorded(p):
        arrived.append(p.grad.detach().clone())
        return hook(p)
    return register(self, recorded)

def spied_step(self, *args, **kwargs):
    stepped.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]
                    if p.grad is not None])
    return step(self, *args, **kwargs)

torch.Tensor.register_post_accumulate_grad_hook, torch.optim.AdamW.step = recording, spied_step
atexit.register(lambda: torch.save({"arrived": arrived, "stepped": stepped}, os.environ["SPY_OUTPUT"]))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_fused_backward_pass_clips_each_tensor(tiny, tmp_path):
    """A --max_grad_norm that is reached, in a launched run: AdamW steps each weight tensor alone, with its gradient
    g clipped on its own to g * min(1, c / |g|) (so its norm is at most c), and the prior still trains."""
    limit, spy = 1e-3, tmp_path / "spy.py"
    spy.write_text(GRADIENT_SPY)
    launch(str(spy), [PRIOR_SCRIPT, *base_args(tiny, tmp_path / "fused", steps=2, **{
        "--fused_backward_pass": True, "--max_grad_norm": limit})], env=offline_env(SPY_OUTPUT=str(tmp_path / "g.pt")))
    seen, start = torch.load(tmp_path / "g.pt"), weights(tiny["prior"], "prior")
    trained = [name for name in start if name not in ("clip_mean", "clip_std")]  # the CLIP statistics are frozen
    assert len(seen["stepped"]) == len(seen["arrived"]) == 2 * len(trained), "not one AdamW step per tensor and step"
    clipped = 0
    for gradient, given in zip(seen["arrived"], seen["stepped"]):
        assert len(given) == 1  # the tensor alone
        norm = gradient.norm()
        assert given[0].norm() <= limit * (1 + 1e-5), (norm, given[0].norm())
        # (torch divides by |g| + 1e-6: a relative 1e-4 here)
        torch.testing.assert_close(given[0], gradient * min(1.0, limit / norm.item()), rtol=1e-3, atol=1e-12)
        clipped += bool(norm > limit)
    assert clipped > len(trained), "the limit was hardly ever reached"
    fused = weights(tmp_path / "fused", "prior")
    assert all(torch.isfinite(t).all() for t in fused.values())
    assert any(not torch.equal(start[k], fused[k]) for k in start), "the clipped run did not train"


def moved_share(trained, start, lr):
    """The share of the weights whose bf16 value changed, among those where an update of 4 x lr is under half a
    bf16 step (so that rounding to the nearest would keep none of it)."""
    moved = total = 0
    for name, tensor in trained.items():
        if start[name].dtype == torch.float32 and tensor.dtype == torch.bfloat16:
            before = start[name].to(torch.bfloat16)
            small = before.float().abs() > 4 * lr * 2 ** 9
            total += small.sum().item()
            moved += (small & (tensor != before)).sum().item()
    assert total > 1000
    return moved / total


def test_full_bf16_keeps_small_updates_and_resumes_exactly(tiny, tmp_path):
    """Prior, AdamW at a learning rate whose updates are under half a bf16 step of most weights: the bf16 weights
    still move; the EMA and the optimizer's moments stay fp32; stopped at step 2 and resumed it ends exactly where
    the uninterrupted run ends."""
    lr = 1e-6
    flags = {"--full_bf16": True, "--mixed_precision": "bf16", "--learning_rate": lr, "--use_ema": True,
             "--checkpointing_steps": 2}
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "whole", **flags), launcher=BF16)
    trained = weights(tmp_path / "whole/checkpoint-4", "prior")
    assert trained["positional_embedding"].dtype == torch.bfloat16
    assert moved_share(trained, weights(tiny["prior"], "prior"), lr) > 0.005
    whole = state_of(tmp_path / "whole/checkpoint-4", "prior")
    assert {t.dtype for t in whole["ema"].values()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in whole["optimizer"].values()} == {torch.float32}
    # the first checkpoint's free-space estimate counts them so, not at the bf16 weights' size (a few kB of
    # random states and configurations are not counted: 0.48 of it before)
    prior = PriorTransformer.from_pretrained(tiny["prior"], subfolder="prior").to(torch.bfloat16)
    estimate = size_estimate(prior, list(prior.parameters()),
                             SimpleNamespace(shadow_params=[p.float() for p in prior.parameters()]))
    written = storage.tree_bytes(tmp_path / "whole/checkpoint-2")
    assert 0.75 * written < estimate < written, (estimate, written)
    stopped_at(tmp_path / "whole", 2, tmp_path / "parts")
    launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "parts", **flags, **{"--resume_from_checkpoint": "latest"}),
           launcher=BF16)
    assert_same_state(whole, state_of(tmp_path / "parts/checkpoint-4", "prior"), ema=True)


def test_low_memory_recipe_trains_the_decoder(tiny, tmp_path):
    """--full_bf16 with --fused_backward_pass, Adafactor and gradient checkpointing: the weights are rounded in the
    backward pass, small updates still move them, and the saved pipeline loads."""
    from diffusers import KandinskyV22Pipeline

    lr = 1e-5
    launch(DECODER_SCRIPT, base_args(tiny, tmp_path, steps=3, **{
        "--full_bf16": True, "--fused_backward_pass": True, "--mixed_precision": "bf16", "--optimizer": "adafactor",
        "--gradient_checkpointing": True, "--learning_rate": lr}), launcher=BF16)
    trained = weights(tmp_path, "unet")
    assert {t.dtype for t in trained.values()} == {torch.bfloat16}
    assert moved_share(trained, weights(tiny["decoder"], "unet"), lr) > 0.005
    KandinskyV22Pipeline.from_pretrained(tmp_path)


def test_memory_levers_refuse_what_they_cannot_do(tmp_path, monkeypatch):
    import train_text_to_image_decoder as decoder

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(checks, "installed", lambda package: True)
    cases = [
        ({"--fused_backward_pass": True, "--optimizer": "prodigy"},
         "Conflicting flags: --fused_backward_pass steps each weight tensor on its own, and Prodigy estimates"),
        ({"--full_bf16": True, "--mixed_precision": "bf16", "--optimizer": "prodigy"},
         "Conflicting flags: --full_bf16 steps each weight tensor on its own"),
        ({"--full_bf16": True}, "--full_bf16 needs --mixed_precision bf16 \\(this run's is no\\)"),
        ({"--full_bf16": True, "--mixed_precision": "fp16"}, "--full_bf16 needs --mixed_precision bf16"),
        ({"--full_bf16": True, "--mixed_precision": "bf16", "--use_lora": True},
         "Conflicting flags: --full_bf16 with --use_lora is not supported"),
        ({"--fused_backward_pass": True, "--mixed_precision": "fp16"},
         "Conflicting flags: --fused_backward_pass with --mixed_precision fp16 is not supported"),
        ({"--fused_backward_pass": True, "WORLD_SIZE": "2"}, "--fused_backward_pass runs on one process only"),
    ]
    for overrides, message in cases:
        argv = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out")]
        with monkeypatch.context() as env:
            for flag, value in overrides.items():
                if flag == "WORLD_SIZE":  # as `accelerate launch --num_processes 2` or torchrun set it
                    env.setenv(flag, value)
                else:
                    argv += [flag] if value is True else [flag, value]
            with pytest.raises(UserError, match=message):
                checks.check_args(decoder.parse_args(argv), "decoder")
    assert not (tmp_path / "out").exists()


def test_fused_backward_pass_on_two_processes_is_refused_in_one_line(tiny, tmp_path):
    """A real launch of two CPU processes (--multi_gpu with ACCELERATE_USE_CPU: a CPU launch of --num_processes 2
    alone starts one): both refuse, the line is printed once, nothing is written."""
    from test_robustness import DDP

    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path / "out", **{"--fused_backward_pass": True}), launcher=DDP,
                  env=offline_env(ACCELERATE_USE_CPU="true"), check=False)
    assert proc.returncode != 0
    assert "local_rank: 1" in proc.stderr, proc.stderr[-3000:]  # torchrun's summary: rank 1 exited with it too
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: --fused_backward_pass runs on one process only: it steps each weight inside the backward "
                     "pass, before the processes average their gradients, so they would drift apart. Drop it or "
                     "train on one process."], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_full_bf16_on_two_processes_keeps_them_identical(tiny, tmp_path):
    """DDP averages the bf16 gradients and every process rounds alike: the run's own check finds the weights
    identical on both processes (it fails the run otherwise)."""
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "bf16",
                "--dynamo_backend", "no", "--main_process_port", "0"]
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=2, **{
        "--full_bf16": True, "--mixed_precision": "bf16", "--learning_rate": 1e-6}), launcher=launcher,
        env=offline_env(ACCELERATE_USE_CPU="true"))
    assert "identical on all 2 processes" in proc.stdout + proc.stderr


def test_fused_pass_on_two_processes_is_refused_once(tmp_path, monkeypatch, capsys):
    """Every process of a two-process run refuses --fused_backward_pass (exit code 2), and only the first says so:
    one line on the console, not one per process."""
    import train_text_to_image_decoder as decoder

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    args = ["--train_data_dir", data, "--output_dir", tmp_path / "out", "--fused_backward_pass"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        said.append(run_in_process(decoder, args, capsys))
    assert error_line(said[0]).startswith("error: --fused_backward_pass runs on one process only")
    assert said[1] == ""


def test_mixed_precision_help_says_what_full_bf16_keeps():
    import argparse

    from kandinsky_train import cli

    parser = argparse.ArgumentParser()
    cli.add_common_arguments(parser, "decoder")
    text = " ".join(parser.format_help().split())
    assert "the trained model keeps fp32 master weights (bf16 ones with --full_bf16)" in text


@pytest.mark.parametrize("script", ["prior", "decoder"])
def test_frozen_encoders_wait_on_the_cpu_with_the_cache(script, tiny, tmp_path):
    """With --cache_embeddings the frozen encoders are loaded on the CPU (the cache's passes bring each to the device
    alone, tests/test_estimate.py); without it they are on the device, which every step uses them on. The "meta"
    device stands in for the GPU."""
    import importlib

    module = importlib.import_module(f"train_text_to_image_{script}")
    accelerator = SimpleNamespace(device=torch.device("meta"), mixed_precision="bf16", is_main_process=True)
    for cached in (False, True):
        flags = base_args(tiny, tmp_path / "out", **({"--cache_embeddings": True} if cached else {}))
        args = module.parse_args([str(a) for a in flags])
        models = module.load_models(args, accelerator)
        frozen = ((models.text_encoder, models.image_encoder) if script == "prior"
                  else (models.movq, models.image_encoder))
        assert {next(m.parameters()).device.type for m in frozen} == {"cpu" if cached else "meta"}


@pytest.mark.parametrize("script", ["prior", "decoder"])
def test_validation_brings_the_frozen_models_to_the_device_one_at_a_time(script, tiny, tmp_path, monkeypatch):
    """With --cache_embeddings and validation prompts, in-process runs on the CPU (the device here): every model that
    comes to the device (runtime.on_device) is recorded with those already there. The CLIP image tower, the largest,
    is never there with another frozen model: the pipelines' negative embedding (CLIP of a zero image) is computed
    with the tower alone; the prior's validation brings the text tower, then the decoder."""
    import contextlib
    import importlib

    from accelerate.state import AcceleratorState

    from kandinsky_train import runtime

    module = importlib.import_module(f"train_text_to_image_{script}")
    together, resident, on_device = [], [], runtime.on_device

    @contextlib.contextmanager
    def recorded(device, *models):
        names = [type(m).__name__ for m in models]
        resident.extend(names)
        together.append(sorted(resident))
        try:
            with on_device(device, *models):
                yield
        finally:
            del resident[-len(names):]

    monkeypatch.setattr(runtime, "on_device", recorded)
    AcceleratorState._reset_state(reset_partial_state=True)
    module.main(module.parse_args([str(a) for a in base_args(
        tiny, tmp_path / "out", steps=2, **{"--cache_embeddings": True, "--validation_steps": 2,
                                            "--validation_prompts": "a red circle"})]))
    tower = "CLIPVisionModelWithProjection"
    assert [names for names in together if tower in names and len(names) > 1] == [], together
    # what ran: the tower for the negative embedding and the caching pass; the prior and text tower (the decoder's
    # validation prompts); the text tower, then the decoder's UNet and MoVQ (the prior's validation)
    wanted = ([["CLIPTextModelWithProjection"], ["UNet2DConditionModel", "VQModel"]] if script == "prior"
              else [["CLIPTextModelWithProjection", "PriorTransformer"], ["VQModel"]])
    assert [tower] in together and all(names in together for names in wanted), together
