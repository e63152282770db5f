# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The models and pictures a benchmark trains on: the full-size Kandinsky 2.2 architectures from benchmarks/configs
(random weights, saved in fp32 safetensors as the Hub repos are) and 64 random 768x768 JPEGs with captions, built
once per work folder; or the tiny models of tools/tiny_kandinsky.py (--quick). Decoder-only runs need no more of
the prior than its CLIP image tower: `parts` leaves out the 1.7 B parameters of the prior and its text encoder."""

import json
import shutil
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
WORDS = ("a photo of red blue green small large old new cat dog house tree car river mountain city street "
         "portrait painting sunset forest robot flower bird boat in the with on").split()


def _config(stage, name):
    return json.loads((CONFIGS / stage / f"{name}.json").read_text())


def _hf_config(name):
    # transformers' config classes take the fields, not the checkpoint's bookkeeping keys
    return {k: v for k, v in _config("prior", name).items() if k not in ("architectures", "model_type")}


def build_prior(path, device):
    import torch
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    import tiny_kandinsky

    torch.manual_seed(0)
    with device:  # random init on the GPU takes seconds; 3.6 B parameters on the CPU take minutes
        prior = PriorTransformer.from_config(_config("prior", "prior"))
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_hf_config("text_encoder")))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_hf_config("image_encoder")))
    with torch.no_grad():  # the scripts divide by clip_std, which an untrained prior holds as zeros
        prior.clip_mean.zero_()
        prior.clip_std.fill_(1.0)
    tokenizer = tiny_kandinsky.write_clip_tokenizer(path.parent / "_tokenizer")  # CLIP's real 49,408-token BPE
    KandinskyV22PriorPipeline(
        prior=prior, text_encoder=text_encoder, image_encoder=image_encoder, tokenizer=tokenizer,
        image_processor=CLIPImageProcessor(**_config("prior", "image_processor")),
        scheduler=UnCLIPScheduler.from_config(_config("prior", "scheduler"))).save_pretrained(str(path))
    shutil.rmtree(path.parent / "_tokenizer")


def build_decoder(path, device):
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel.from_config(_config("decoder", "unet"))
        movq = VQModel.from_config(_config("decoder", "movq"))
    KandinskyV22Pipeline(unet=unet, movq=movq, scheduler=DDPMScheduler.from_config(_config("decoder", "scheduler"))
                         ).save_pretrained(str(path))


def build_images(path, device=None, count=64, size=768):
    """Smooth random colour fields plus a little grain: JPEGs of photo-like size and decode cost (white noise would
    be several times larger), each with a random caption."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    rows = []
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(low, np.int16) + rng.integers(-8, 9, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path / f"{i:03d}.jpg", quality=90)
        rows.append({"file_name": f"{i:03d}.jpg", "text": " ".join(rng.choice(WORDS, 8))})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_prior_vision(path, device):
    """The prior repo as far as the decoder scripts, ours and the reference, read it: the CLIP image tower and its
    image processor (7 GB to write instead of 14)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with device:
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_hf_config("image_encoder")))
    image_encoder.save_pretrained(str(path / "image_encoder"))
    CLIPImageProcessor(**_config("prior", "image_processor")).save_pretrained(str(path / "image_processor"))


BUILDERS = {"prior": build_prior, "prior-vision": build_prior_vision, "decoder": build_decoder,
            "images": build_images}


# The files of a model folder that holds nothing but configurations (--estimate_memory needs no more)
CONFIG_FILES = {"prior": {"prior": "prior/config.json", "text_encoder": "text_encoder/config.json",
                          "image_encoder": "image_encoder/config.json",
                          "image_processor": "image_processor/preprocessor_config.json",
                          "scheduler": "scheduler/scheduler_config.json"},
                "decoder": {"unet": "unet/config.json", "movq": "movq/config.json",
                            "scheduler": "scheduler/scheduler_config.json"}}


def build_configs(root):
    """{"prior": folder, "decoder": folder}: the full-size models' configuration files, laid out as the Hub repos
    are, and no weight (the prior's tokenizer folder holds only its configuration)."""
    for stage, files in CONFIG_FILES.items():
        for name, file in files.items():
            (root / stage / file).parent.mkdir(parents=True, exist_ok=True)
            (root / stage / file).write_text(json.dumps(_config(stage, name), indent=2))
    tokenizer = root / "prior" / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return {stage: root / stage for stage in CONFIG_FILES}


def build_full(root, parts=("prior", "decoder", "images")):
    """The full-size repos and image folder under root; each part is built once (a .done marker says complete).
    Returns their paths by role: "prior" is the prior-vision folder where that was built instead."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in parts:
        path, done = root / name, root / f"{name}.done"
        if done.exists():
            continue
        shutil.rmtree(path, ignore_errors=True)  # a half-built leftover of an interrupted run
        print(f"Building {path} on {device.type} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        BUILDERS[name](path, device)
        done.touch()
        print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back before the training subprocesses start
    return {name.split("-")[0]: root / name for name in parts}


def build_quick(root):
    import tiny_kandinsky

    done = root / "tiny.done"
    if not done.exists():
        shutil.rmtree(root / "tiny", ignore_errors=True)
        tiny_kandinsky.build_all(str(root / "tiny"))
        done.touch()
    return {name: root / "tiny" / name for name in ("prior", "decoder", "images")}

