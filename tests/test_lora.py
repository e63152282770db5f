"""--use_lora: adapters through peft on the attention projections, only they train, checkpoints resume, and the
final adapter file loads into the stock pipeline and changes its output."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_lora_trains_resumes_and_loads_into_the_stock_pipeline(stage, tiny, tmp_path):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    script = PRIOR_SCRIPT if stage == "prior" else DECODER_SCRIPT
    lora = {"--use_lora": True, "--rank": 4, "--lora_alpha": 8, "--learning_rate": 1e-2, "--checkpointing_steps": 2}
    proc = launch(script, base_args(tiny, tmp_path, steps=2, **lora))
    assert "trainable parameters" in proc.stdout
    launch(script, base_args(tiny, tmp_path, steps=4, **lora, **{"--resume_from_checkpoint": "latest"}))
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    sub = "prior" if stage == "prior" else "unet"
    assert (tmp_path / "checkpoint-4" / f"{sub}_lora" / "pytorch_lora_weights.safetensors").is_file()
    adapter = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    assert not (tmp_path / sub).exists()  # the output is the small adapter, not a full model
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    if stage == "prior":
        pipe = KandinskyV22PriorPipeline.from_pretrained(tiny["prior"])
        before = pipe("a red circle", num_inference_steps=2, generator=generator()).image_embeds
        pipe.prior.load_lora_adapter(str(tmp_path), prefix=None, weight_name="pytorch_lora_weights.safetensors")
        after = pipe("a red circle", num_inference_steps=2, generator=generator()).image_embeds
    else:
        pipe = KandinskyV22Pipeline.from_pretrained(tiny["decoder"])
        embeds = torch.randn(1, 32, generator=generator())
        call = dict(image_embeds=embeds, negative_image_embeds=torch.zeros(1, 32), height=64, width=64,
                    num_inference_steps=2, output_type="pt")
        before = pipe(**call, generator=generator()).images
        pipe.unet.load_lora_adapter(str(tmp_path), prefix=None, weight_name="pytorch_lora_weights.safetensors")
        after = pipe(**call, generator=generator()).images
    assert (before - after).abs().max() > 1e-6, "the adapter did not change the output"
