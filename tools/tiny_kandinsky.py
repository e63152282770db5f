# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Tiny, randomly initialised Kandinsky 2.2 repos and small captioned image sets, built offline.

Used by the tests, the CPU demo and `benchmarks/benchmark.py --quick`. The models are the real diffusers and
transformers classes saved with `save_pretrained`, so the scripts load them exactly as they load the Hub repos.
The tokenizer is CLIP's real BPE tokenizer, rebuilt from the merges file that open_clip_torch ships.

    python tools/tiny_kandinsky.py OUT_DIR [--num_images N]
"""

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

EMBED_DIM = 32  # CLIP projection = prior embedding = UNet image-embedding size
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ["circle", "square", "triangle", "stripe"]


def _bytes_to_unicode():
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_tokenizer(path):
    """CLIP's 49,408-token BPE vocabulary, built from open_clip's copy of OpenAI's merges file."""
    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("The tiny models need CLIP's BPE merges file from open_clip_torch: "
                         "pip install --no-deps open_clip_torch")
    merges_gz = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(merges_gz).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), bos_token="<|startoftext|>",
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def build_tiny_prior(path, seed=0):
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=EMBED_DIM,
                             num_embeddings=77, additional_embeddings=4, added_emb_type="prd",
                             encoder_hid_proj_type="linear", time_embed_act_fn="silu")
    with torch.no_grad():  # a trained prior carries real embedding statistics; zeros would divide by zero
        prior.clip_mean.copy_(0.1 * torch.randn_like(prior.clip_mean))
        prior.clip_std.copy_(1.0 + 0.1 * torch.rand_like(prior.clip_std))
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=EMBED_DIM, projection_dim=EMBED_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5))
    torch.manual_seed(seed + 2)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=EMBED_DIM, projection_dim=EMBED_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=4, num_channels=3))
    tokenizer = write_clip_tokenizer(Path(path) / "_tokenizer_build")
    image_processor = CLIPImageProcessor(
        crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, do_center_crop=True, do_normalize=True,
        do_resize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler,
                              image_processor=image_processor).save_pretrained(str(path))
    import shutil

    shutil.rmtree(Path(path) / "_tokenizer_build")
    return str(path)


DECODER_UNETS = {  # decoder type -> (pipeline class, UNet input channels, addition_embed_type), as the Hub's repos
    "text2img": ("KandinskyV22Pipeline", 4, "image"),
    "inpaint": ("KandinskyV22InpaintPipeline", 9, "image"),  # noisy latents, masked latents, mask
    "controlnet": ("KandinskyV22ControlnetPipeline", 8, "image_hint"),  # noisy latents, the hint's 4 features
}


def build_tiny_decoder(path, seed=0, decoder_type="text2img"):
    """A tiny decoder repo of `decoder_type` (see DECODER_UNETS); the same MoVQ and scheduler for every type."""
    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    pipeline_class, in_channels, addition_embed_type = DECODER_UNETS[decoder_type]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=in_channels, out_channels=8, addition_embed_type=addition_embed_type,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
        encoder_hid_dim=EMBED_DIM, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8, sample_size=8)
    torch.manual_seed(seed + 1)
    # Four levels, like the real MoVQ, so the latent scale factor is 8 (its SpatialNorm needs 32 channels).
    movq = VQModel(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3 +
                   ["AttnDownEncoderBlock2D"], up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
                   in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                   norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4)
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              num_train_timesteps=1000, prediction_type="epsilon",
                              steps_offset=1, thresholding=False, variance_type="fixed_small")
    getattr(diffusers, pipeline_class)(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(str(path))
    return str(path)


def _draw(index, size, rng):
    """A coloured shape on a gradient: varied enough that the models have something to learn."""
    names = list(COLOURS)
    colour, background = names[index % len(names)], names[(index * 3 + 5) % len(names)]
    shape = SHAPES[index % len(SHAPES)]
    width, height = [(size, size), (size, size * 3 // 4), (size * 5 // 4, size)][index % 3]
    base = np.array(COLOURS[background], np.float32)
    ramp = np.linspace(0.6, 1.0, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(base * ramp + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    box = [width // 4, height // 4, width * 3 // 4, height * 3 // 4]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    else:
        draw.rectangle([0, box[1], width, box[1] + height // 6], fill=fill)
    return image, f"a {colour} {shape} on a {background} background"


def build_image_folder(path, num_images=8, size=64, seed=0):
    """An image folder with metadata.jsonl (columns `image`, `text`), PNG and JPEG, a few aspect ratios."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        image, caption = _draw(i, size, rng)
        name = f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        image.save(path / name)
        rows.append({"file_name": name, "text": caption})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _encoded(image, fmt):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_parquet(file, drawn, image_column="image", caption_column="text", names=None):
    """(picture, caption) pairs as one parquet file: an Image column (PNG bytes, each named by `names` if given)
    and a string column."""
    import datasets

    features = datasets.Features({image_column: datasets.Image(), caption_column: datasets.Value("string")})
    names = names or [None] * len(drawn)
    rows = {image_column: [{"bytes": _encoded(image, "PNG"), "path": name} for (image, _), name in zip(drawn, names)],
            caption_column: [caption for _, caption in drawn]}
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(file))


def paired_picture(image, kind, rng):
    """The picture's partner of `kind`: an inpainting mask (white = repaint: a random box, in L mode) or a
    ControlNet hint (a grey "depth map" that darkens left to right, with the picture's shape's outline brighter),
    of the picture's size."""
    width, height = image.size
    if kind == "mask":
        mask = Image.new("L", (width, height), 0)
        left, top = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        ImageDraw.Draw(mask).rectangle([left, top, left + width // 3, top + height // 3], fill=255)
        return mask
    depth = np.linspace(220, 40, width, dtype=np.float32)[None, :].repeat(height, 0)
    grey = np.asarray(image.convert("L"), np.float32)
    return Image.fromarray(np.clip(0.6 * depth + 0.4 * grey, 0, 255).astype(np.uint8)).convert("RGB")


def build_paired_dataset(path, kind, num_images=8, size=64, seed=0, column=None):
    """A local parquet data set (data/train-*.parquet) of pictures, captions and a paired picture column of `kind`
    ("mask": column `mask`; "hint": column `conditioning_image`), for the inpainting and ControlNet decoders."""
    import datasets

    column = column or {"mask": "mask", "hint": "conditioning_image"}[kind]
    rng = np.random.default_rng(seed + 400)
    drawn = [_draw(i, size, rng) for i in range(num_images)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  column: datasets.Image()})
    rows = {"image": [{"bytes": _encoded(image, "PNG"), "path": None} for image, _ in drawn],
            "text": [caption for _, caption in drawn],
            column: [{"bytes": _encoded(paired_picture(image, kind, rng), "PNG"), "path": None} for image, _ in drawn]}
    file = Path(path) / "data" / "train-00000-of-00001.parquet"
    file.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(file))
    return str(path)


def build_parquet_dataset(path, num_images=8, size=64, seed=0, image_column="img", caption_column="caption"):
    """A local dataset folder in the Hub's layout (data/train-*.parquet), for --dataset_name."""
    rng = np.random.default_rng(seed + 100)
    _write_parquet(Path(path) / "data" / "train-00000-of-00001.parquet",
                   [_draw(i + 3, size, rng) for i in range(num_images)], image_column, caption_column)
    return str(path)


def build_parquet_shards(path, sizes=(4, 4, 4, 4), size=64, seed=0, no_caption=()):
    """A local dataset folder of parquet shards of `sizes` rows (data/train-0000K-of-0000N.parquet), columns image
    (named 00000.png, 00001.png... in order) and text (missing for the rows numbered in `no_caption`): the Hub's
    layout of a large data set, for --streaming."""
    rng = np.random.default_rng(seed + 200)
    first = 0
    for shard, rows in enumerate(sizes):
        drawn = [_draw(first + i, size, rng) for i in range(rows)]
        drawn = [(image, None if first + i in no_caption else caption) for i, (image, caption) in enumerate(drawn)]
        _write_parquet(Path(path) / "data" / f"train-{shard:05d}-of-{len(sizes):05d}.parquet", drawn,
                       names=[f"{first + i:05d}.png" for i in range(rows)])
        first += rows
    return str(path)


def build_webdataset_shards(path, num_shards=4, per_shard=4, size=64, seed=0):
    """A folder of WebDataset shards (shard-K.tar, each sample a KEY.jpg and its caption KEY.txt), for --streaming
    with --image_column jpg --caption_column txt."""
    import io
    import tarfile

    rng = np.random.default_rng(seed + 300)
    Path(path).mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with tarfile.open(Path(path) / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                image, caption = _draw(shard * per_shard + i, size, rng)
                for name, payload in ((f"{shard:02d}{i:03d}.jpg", _encoded(image, "JPEG")),
                                      (f"{shard:02d}{i:03d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(path)


def build_all(root, num_images=8):
    root = Path(root)
    return {"prior": build_tiny_prior(root / "prior"), "decoder": build_tiny_decoder(root / "decoder"),
            "images": build_image_folder(root / "images", num_images),
            "parquet": build_parquet_dataset(root / "parquet", num_images)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build tiny random Kandinsky 2.2 models and a small image set.")
    parser.add_argument("out_dir", help="Folder to create prior/, decoder/, images/ and parquet/ in.")
    parser.add_argument("--num_images", type=int, default=8, help="Images in each data set.")
    cli = parser.parse_args()
    for name, built in build_all(cli.out_dir, cli.num_images).items():
        print(f"{name}: {built}")
