"""--use_lora: adapters through peft on the attention projections, only they train, checkpoints resume, and the
final adapter file loads into the stock pipeline and changes its output."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch
from test_robustness import assert_same_state, state_of


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_lora_trains_resumes_and_loads_into_the_stock_pipeline(stage, tiny, tmp_path):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    script = PRIOR_SCRIPT if stage == "prior" else DECODER_SCRIPT
    sub = "prior" if stage == "prior" else "unet"
    lora = {"--use_lora": True, "--rank": 4, "--lora_alpha": 8, "--learning_rate": 1e-2, "--checkpointing_steps": 2}
    whole = tmp_path / "whole"
    proc = launch(script, base_args(tiny, whole, steps=4, **lora))
    # only the adapters train: the plan line counts what the adapter file holds
    adapter_size = sum(v.numel() for v in load_file(whole / "pytorch_lora_weights.safetensors").values())
    assert f", {adapter_size:,} trainable parameters," in proc.stdout
    # Resume the adapter from the uninterrupted run's checkpoint-2: it must end exactly where that run ended.
    out = tmp_path / "out"
    shutil.copytree(whole / "checkpoint-2", out / "checkpoint-2")
    launch(script, base_args(tiny, out, steps=4, **lora, **{"--resume_from_checkpoint": "latest"}))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    adapter_state = [state_of(run / "checkpoint-4", f"{sub}_lora") for run in (whole, out)]
    assert_same_state(*adapter_state, ema=False)
    # --seed repeats the adapter's random initialisation: a new 2-step run is where the 4-step one was at step 2
    again = tmp_path / "again"
    launch(script, base_args(tiny, again, steps=2, **lora))
    assert_same_state(*(state_of(run / "checkpoint-2", f"{sub}_lora") for run in (whole, again)), ema=False)
    adapter = load_file(out / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    assert not (out / sub).exists()  # the output is the small adapter, not a full model
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    if stage == "prior":
        pipe = KandinskyV22PriorPipeline.from_pretrained(tiny["prior"])
        before = pipe("a red circle", num_inference_steps=2, generator=generator()).image_embeds
        pipe.prior.load_lora_adapter(str(out), prefix=None, weight_name="pytorch_lora_weights.safetensors")
        after = pipe("a red circle", num_inference_steps=2, generator=generator()).image_embeds
    else:
        pipe = KandinskyV22Pipeline.from_pretrained(tiny["decoder"])
        embeds = torch.randn(1, 32, generator=generator())
        call = dict(image_embeds=embeds, negative_image_embeds=torch.zeros(1, 32), height=64, width=64,
                    num_inference_steps=2, output_type="pt")
        before = pipe(**call, generator=generator()).images
        pipe.unet.load_lora_adapter(str(out), prefix=None, weight_name="pytorch_lora_weights.safetensors")
        after = pipe(**call, generator=generator()).images
    assert (before - after).abs().max() > 1e-6, "the adapter did not change the output"


def test_a_v_prediction_adapter_is_saved_with_its_scheduler_and_the_card_sets_it(tiny, tmp_path):
    """The stock decoder's scheduler predicts epsilon: the card's code must sample the adapter with the scheduler
    it was trained with, saved beside it."""
    import re

    from diffusers import DDPMScheduler
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    launch(DECODER_SCRIPT, base_args(tiny, out, steps=1, **{"--use_lora": True, "--prediction_type": "v_prediction"}))
    assert DDPMScheduler.from_pretrained(out, subfolder="scheduler").config.prediction_type == "v_prediction"
    code = re.search(r"```python\n(.*?)```", ModelCard.load(out / "README.md").text, re.S).group(1)
    code = code[:code.index("embeds = prior(")]  # the pipelines as the card builds them
    for placeholder, path in (("path/to/prior", tiny["prior"]), ("path/to/decoder", tiny["decoder"]),
                              ("path/to/out", out)):  # the card names the output folder, not its local path
        code = code.replace(f'"{placeholder}"', f'"{path}"')
    scope = {}
    exec(code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32"), scope)
    assert scope["decoder"].scheduler.config.prediction_type == "v_prediction"
    assert any("lora" in name for name in scope["decoder"].unet.state_dict())


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_frozen_base_is_cast_once_with_the_same_math(stage, tiny):
    """With mixed precision the frozen base's linear and convolution weights are stored in the half dtype instead
    of being cast by autocast in every forward pass: the prediction and the adapters' gradients are bit for bit
    what the fp32 base gives."""
    import copy
    from types import SimpleNamespace

    from diffusers import PriorTransformer, UNet2DConditionModel

    from kandinsky_train.memory import cast_frozen_layers
    from kandinsky_train.runtime import add_lora

    torch.manual_seed(0)
    if stage == "prior":
        model = PriorTransformer.from_pretrained(tiny["prior"], subfolder="prior")
        c, targets = model.config, ["to_q", "to_k", "to_v", "to_out.0"]
        inputs = dict(hidden_states=torch.randn(2, c.embedding_dim), timestep=torch.tensor([3, 700]),
                      proj_embedding=torch.randn(2, c.embedding_dim),
                      encoder_hidden_states=torch.randn(2, c.num_embeddings, c.embedding_dim),
                      attention_mask=torch.ones(2, c.num_embeddings, dtype=torch.bool))
    else:
        model = UNet2DConditionModel.from_pretrained(tiny["decoder"], subfolder="unet")
        c, targets = model.config, ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
        inputs = dict(sample=torch.randn(2, c.in_channels, 8, 8), timestep=torch.tensor([10, 500]),
                      encoder_hidden_states=None, added_cond_kwargs={"image_embeds": torch.randn(2, c.encoder_hid_dim)})
    lora = SimpleNamespace(rank=4, lora_alpha=8)
    fp32_base, half_base = model, copy.deepcopy(model)
    add_lora(lora, fp32_base, targets)
    add_lora(lora, half_base, targets)
    cast_frozen_layers(half_base, torch.bfloat16)
    for a, b in zip(fp32_base.parameters(), half_base.parameters()):
        if a.requires_grad:
            b.data = a.data.normal_().clone()  # lora_B starts at zero: give the adapters something to do
    linear = [m.weight for m in half_base.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert {w.dtype for w in linear if not w.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in half_base.parameters() if p.requires_grad} == {torch.float32}
    assert any(p.dtype == torch.float32 for p in half_base.parameters() if not p.requires_grad)  # norms

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)[0]
        out.float().pow(2).mean().backward()
        return out, [p.grad for p in model.parameters() if p.requires_grad]

    (out_a, grads_a), (out_b, grads_b) = step(fp32_base), step(half_base)
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
