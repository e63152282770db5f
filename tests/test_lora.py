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
