# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Model FLOPs utilization (MFU): the FLOPs of one training sample, counted once with
torch.utils.flop_counter.FlopCounterMode on the models of a run's folders (built on the meta device: no memory, no
weights read), times samples/s, over the GPU's peak dense bf16 tensor FLOP/s.

What counts as one sample's work: the trained model's forward and backward at the run's resolution, plus the
frozen encoders' forward when the run does not cache their outputs (--cache_embeddings). Gradient checkpointing's
second forward is not counted: it is recomputation, not the model's work (MFU, not hardware FLOPs utilization).
FlopCounterMode counts matrix products, convolutions and attention, not elementwise work.
"""

import functools
import re

# Dense (no sparsity) bf16 tensor-core FLOP/s of the SXM parts, from NVIDIA's H100 and H200 datasheets (989.4
# TFLOP/s; fp16 is the same). torch names the H100 SXM "NVIDIA H100 80GB HBM3"; PCIe and NVL parts have lower
# figures and are not matched here: give --peak_tflops for any other GPU.
PEAK_BF16_FLOPS = ((r"H100 80GB HBM3|H100 SXM", 989.4e12), (r"H200(?! NVL)", 989.4e12))


def peak_flops(device_name, override_tflops=None):
    """The peak bf16 FLOP/s MFU is taken against, or None when unknown (a CPU, another GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, device_name)), None)


def _count(fn):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        fn()
    return counter.get_total_flops()


def _train_step(model, inputs, output):
    """A forward and backward of the trained model on meta tensors."""
    getattr(model(**inputs), output).float().sum().backward()


@functools.lru_cache(maxsize=None)
def decoder_sample_flops(decoder_path, prior_path, resolution, cached):
    import torch
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(decoder_path, subfolder="unet"))
        movq = VQModel.from_config(VQModel.load_config(decoder_path, subfolder="movq"))
        vision = CLIPVisionConfig.from_pretrained(prior_path, subfolder="image_encoder")
        image_encoder = CLIPVisionModelWithProjection(vision)
        with torch.no_grad():  # an input, not part of the trained model's graph
            latents = movq.encode(torch.zeros(1, 3, resolution, resolution)).latents
    inputs = dict(sample=latents, timestep=torch.tensor([500], device="meta"), encoder_hidden_states=None,
                  added_cond_kwargs={"image_embeds": torch.zeros(1, unet.config.encoder_hid_dim, device="meta")})
    flops = _count(lambda: _train_step(unet, inputs, "sample"))
    if not cached:
        with torch.no_grad():
            flops += _count(lambda: movq.encode(torch.zeros(1, 3, resolution, resolution)))
            flops += _count(lambda: image_encoder(torch.zeros(1, 3, vision.image_size, vision.image_size)))
    return flops


@functools.lru_cache(maxsize=None)
def prior_sample_flops(prior_path, cached):
    import torch
    from diffusers import PriorTransformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        prior = PriorTransformer.from_config(PriorTransformer.load_config(prior_path, subfolder="prior"))
        text_config = CLIPTextConfig.from_pretrained(prior_path, subfolder="text_encoder")
        text_encoder = CLIPTextModelWithProjection(text_config)
        vision = CLIPVisionConfig.from_pretrained(prior_path, subfolder="image_encoder")
        image_encoder = CLIPVisionModelWithProjection(vision)
        tokens = torch.zeros(1, text_config.max_position_embeddings, dtype=torch.long)
        with torch.no_grad():
            text = text_encoder(tokens)
    inputs = dict(hidden_states=torch.zeros(1, prior.config.embedding_dim, device="meta"),
                  timestep=torch.tensor([500], device="meta"), proj_embedding=text.text_embeds,
                  encoder_hidden_states=text.last_hidden_state,
                  attention_mask=torch.ones(tokens.shape, dtype=torch.bool, device="meta"))
    flops = _count(lambda: _train_step(prior, inputs, "predicted_image_embedding"))
    if not cached:
        with torch.no_grad():
            flops += _count(lambda: text_encoder(tokens))
            flops += _count(lambda: image_encoder(torch.zeros(1, 3, vision.image_size, vision.image_size)))
    return flops


def sample_flops(stage, paths, resolution, cached):
    """FLOPs of one training sample of `stage` with the models under paths["prior"] / paths["decoder"]."""
    if stage == "decoder":
        return decoder_sample_flops(str(paths["decoder"]), str(paths["prior"]), int(resolution), bool(cached))
    return prior_sample_flops(str(paths["prior"]), bool(cached))
