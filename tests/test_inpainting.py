"""The inpainting decoder (issue 21): the UNet's 9 input channels built in training are the ones
KandinskyV22InpaintPipeline builds; a run with a mask column or with drawn masks resumes mid-epoch bit-exactly (and
cached equals uncached); its output loads and inpaints as the model card says; drawn masks depend on the sample's
seed alone and cover the advertised shares; bad input gets one line; the masked region's loss drops."""

import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import DECODER_SCRIPT, base_args, launch, offline_env
from test_buckets import resume_from
from test_robustness import error_line, run_in_process
from test_train import max_change, weights


def inpaint_args(tiny, tiny_inpaint, output_dir, steps=4, **overrides):
    return base_args(tiny, output_dir, steps=steps, **{
        "--pretrained_decoder_model_name_or_path": tiny_inpaint["decoder"], "--train_data_dir": None,
        "--dataset_name": tiny_inpaint["data"], **overrides})


def data_rows(tiny_inpaint):
    """The tiny inpainting set's (picture, mask) pairs, as PIL images."""
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(tiny_inpaint["data"] / "data" / "*.parquet"))["train"]
    return [(row["image"].convert("RGB"), row["mask"]) for row in table]


def noise_mask(seed, size=64):
    """A mask of random grey levels: its threshold and its nearest-neighbour sampling decide each latent pixel."""
    grey = np.random.default_rng(seed).integers(0, 145, (size, size), dtype=np.uint8)  # 12% at 128 or more
    return Image.fromarray(grey, "L")


# --- the UNet's input, as the pipeline builds it ---------------------------------------------------------------

def test_the_vectorised_growth_is_the_pipelines_prepare_mask():
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask

    from kandinsky_train.inpainting import grow

    generator = torch.Generator().manual_seed(0)
    for height, width, density in [(8, 8, 0.1), (9, 13, 0.3), (5, 7, 0.6), (6, 6, 0.0)]:
        repaint = (torch.rand(2, 1, height, width, generator=generator) < density).to(torch.uint8)
        keep = prepare_mask((1 - repaint).float())  # the pipeline's keep mask, grown by its loop
        assert torch.equal(~grow(repaint), keep.bool()), (height, width, density)


@pytest.mark.parametrize("which", ["data set mask", "grey noise mask"])
def test_the_training_input_is_the_one_the_pipeline_gives_the_unet(tiny, tiny_inpaint, which):
    """For a picture and mask at the training size, channels 4:9 of the UNet's input (the latents where kept, and
    keep) built by the training code equal those the pipeline builds (a spy UNet records them)."""
    from diffusers import KandinskyV22InpaintPipeline
    from transformers import CLIPImageProcessor

    import train_text_to_image_decoder as script
    from kandinsky_train import decoders
    from kandinsky_train.images import RESAMPLING

    picture, mask = data_rows(tiny_inpaint)[3]  # 64x64: the pipeline does not crop
    mask = noise_mask(3) if which == "grey noise mask" else mask
    pipe = KandinskyV22InpaintPipeline.from_pretrained(tiny_inpaint["decoder"])
    seen = [pipeline_input(pipe, picture, mask)]

    args = script.parse_args(list(map(str, inpaint_args(tiny, tiny_inpaint, "-", **{"--mask_column": "mask"}))))
    decoder = decoders.Inpainting(args)
    processor = CLIPImageProcessor.from_pretrained(tiny["prior"], subfolder="image_processor")
    sample = script.decoder_sample(picture, 64, RESAMPLING[args.image_interpolation_mode], processor)
    sample.update(decoder.sample_inputs(picture, {"mask": mask}, 64, RESAMPLING[args.image_interpolation_mode]))
    batch = {key: torch.stack([value]) for key, value in sample.items()}  # as collate makes them
    with torch.no_grad():
        latents = pipe.movq.encode(batch["pixel_values"]).latents
        built, added = decoder.unet_inputs(torch.zeros_like(latents), {"latents": latents,
                                                                        **decoder.encode_inputs(batch, latents)})
    assert added == {} and built.shape == (1, 9, 8, 8) and seen[0].shape == (1, 5, 8, 8)
    keep = built[:, 8]
    assert 0 < keep.sum() < keep.numel()  # some kept, some repainted: the comparison means something
    assert same_masked_input(built[:, 4:], seen[0])


def pipeline_input(pipe, picture, mask):
    """Channels 4 to 9 (the picture's latents where kept, and keep) of the input KandinskyV22InpaintPipeline gives
    its UNet for a picture and its mask at the picture's size (a spy records it)."""
    seen = []
    pipe.unet.forward = lambda *args, forward=pipe.unet.forward, **kwargs: seen.append(kwargs["sample"]) or forward(
        *args, **kwargs)
    try:
        pipe(image_embeds=torch.randn(1, 32), negative_image_embeds=torch.zeros(1, 32), image=picture,
             mask_image=mask, height=picture.height, width=picture.width, num_inference_steps=1, guidance_scale=1.0,
             output_type="latent")
    finally:
        del pipe.unet.forward
    return seen[0][:, 4:]


def same_masked_input(built, expected):
    """Whether channels 4 to 9 built in training are the pipeline's: keep exactly (polarity, grid and growth); the
    latents where kept up to MoVQ's rounding (the pipeline lays its pixels out channels-last)."""
    return bool(torch.equal(built[:, 4], expected[:, 4]) and torch.equal(built[:, :4] == 0, expected[:, :4] == 0)
                and (built[:, :4] - expected[:, :4]).abs().max() <= 1e-4)


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA"])
def test_a_mask_file_is_read_and_resized_as_the_pipeline_reads_it(tmp_path, mode):
    """A mask of any mode (RGBA: opaque), larger than the training size, repaints in training the pixels that
    KandinskyV22InpaintPipeline repaints for the same file loaded as the README's code loads it (load_image): its
    LANCZOS resize, not --image_interpolation_mode's bicubic one."""
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask_and_masked_image
    from diffusers.utils import load_image

    import train_text_to_image_decoder as script
    from kandinsky_train import decoders

    args = script.parse_args(["--mask_column", "mask", "--resolution", "64"])
    grey = np.random.default_rng(1).integers(0, 256, (96, 96), dtype=np.uint8)
    Image.fromarray(grey, "L").convert(mode).save(tmp_path / "mask.png")
    picture = Image.new("RGB", (96, 96))
    row = {"image": str(tmp_path / "picture.png"), "mask": str(tmp_path / "mask.png")}
    trained = decoders.Inpainting(args).sample_inputs(picture, row, 64, Image.BICUBIC)["mask_pixels"]
    keep, _ = prepare_mask_and_masked_image(picture, load_image(str(tmp_path / "mask.png")), 64, 64)
    assert 0.3 < trained.float().mean() < 0.7
    assert torch.equal(trained[None].float(), 1 - keep)


# --- drawn masks ---------------------------------------------------------------------------------------------

def test_drawn_masks_depend_on_the_sample_seed_alone():
    """A sample's mask is a function of (--seed, epoch, sample): the same in any batch, on any process (each takes
    a slice of the samples), after a resume; another epoch draws another."""
    from kandinsky_train.diffusion import sample_seeds
    from kandinsky_train.inpainting import draw_masks

    def masks(epoch, indices):
        return draw_masks(sample_seeds(7, epoch, indices).tolist(), (8, 12), 0.25, 0.35)

    whole = masks(2, range(16))
    assert whole.shape == (16, 1, 8, 12) and whole.dtype == torch.uint8
    for rank in range(2):  # two processes' shares, in batches of 3
        share = list(range(16))[rank::2]
        parts = torch.cat([masks(2, share[i:i + 3]) for i in range(0, len(share), 3)])
        assert torch.equal(parts, whole[rank::2])
    assert torch.equal(masks(2, [11, 4]), whole[[11, 4]])
    assert not torch.equal(masks(3, range(16)), whole)


@pytest.mark.parametrize("full, strokes", [(0.25, 0.35), (0.1, 0.6), (0.0, 1.0)])
def test_drawn_masks_cover_the_advertised_shares(full, strokes):
    from kandinsky_train.inpainting import draw

    drawn = [draw(seed, 16, 24, full, strokes) for seed in range(3000)]
    kinds = [kind for kind, _ in drawn]
    assert abs(kinds.count("full") / 3000 - full) < 0.03
    assert abs(kinds.count("strokes") / 3000 - strokes) < 0.03
    assert all(mask.shape == (16, 24) and mask.all() == (kind == "full") and mask.any() for kind, mask in drawn)


# --- runs ----------------------------------------------------------------------------------------------------

def masked(root):
    """The masked run's flags: its image folder's masks, mirrored, a checkpoint every 3 steps."""
    return {"--train_data_dir": root / "data", "--dataset_name": None, "--mask_column": "mask", "--random_flip": True,
            "--checkpointing_steps": 3, "--learning_rate": 2e-3}


def image_folder(tiny_inpaint, folder):
    """The tiny inpainting set as an image folder whose metadata.jsonl names each mask's file, in a subfolder."""
    (folder / "masks").mkdir(parents=True)
    lines = []
    for number, (picture, mask) in enumerate(data_rows(tiny_inpaint)):
        picture.save(folder / f"{number}.png")
        mask.save(folder / "masks" / f"{number}.png")
        lines.append(json.dumps({"file_name": f"{number}.png", "text": "a shape", "mask": f"masks/{number}.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_masked_run_resumes_exactly_learns_and_inpaints_as_its_model_card_says(tiny, tiny_inpaint, tmp_path):
    """16 steps (4 epochs of 8 pictures, batch 2) with the data set's masks (an image folder naming their files),
    mirrored, a checkpoint every 3 steps, validation images inpainted at the end. checkpoint-3 lies in the middle of
    the first epoch: resumed from it with --cache_embeddings (the masks on the latent grid cached with the latents,
    per mirrored version), checkpoint-6 is the uninterrupted run's. The masked region's loss dropped, and the output
    inpaints as its card says. (One test: the run is shared without a fixture that two workers would each build.)"""
    from test_robustness import assert_same_state, state_of

    noise_mask(5).save(tmp_path / "mask.png")
    data_rows(tiny_inpaint)[0][0].save(tmp_path / "picture.png")
    image_folder(tiny_inpaint, tmp_path / "data")
    whole = tmp_path / "whole"
    launch(DECODER_SCRIPT, inpaint_args(tiny, tiny_inpaint, whole, steps=16, **masked(tmp_path), **{
        "--validation_prompts": ["a red circle", "a blue square"], "--validation_image": tmp_path / "picture.png",
        "--validation_mask_image": tmp_path / "mask.png", "--validation_epochs": 100}))
    assert [Image.open(whole / "validation" / f"step-000016-0{i}.png").size for i in range(2)] == [(64, 64)] * 2
    # the checkpoint says which decoder it is: no other decoder resumes it (issue 29)
    assert json.loads((whole / "checkpoint-3" / "training_state.json").read_text())["decoder_type"] == "inpaint"
    cached = resume_from(whole, "checkpoint-3", tmp_path / "cached")
    launch(DECODER_SCRIPT, inpaint_args(tiny, tiny_inpaint, cached, steps=6, **masked(tmp_path), **{
        "--resume_from_checkpoint": "latest", "--cache_embeddings": True}))
    assert list((cached / "embedding_cache").iterdir())
    assert_same_state(state_of(whole / "checkpoint-6", "unet"), state_of(cached / "checkpoint-6", "unet"), ema=False)

    before = masked_loss(tiny_inpaint["decoder"] / "unet", tiny, tiny_inpaint)
    after = masked_loss(whole / "unet", tiny, tiny_inpaint)
    assert after < 0.8 * before, (before, after)
    check_the_output(tiny, tmp_path)


def check_the_output(tiny, root):
    """The saved folder is a KandinskyV22InpaintPipeline that AutoPipelineForInpainting also loads (with the prior's
    components), and the card's code runs as written (on the CPU, at a tiny size)."""
    from diffusers import AutoPipelineForInpainting, KandinskyV22PriorPipeline

    whole = root / "whole"
    card = (whole / "README.md").read_text()
    assert "\n# Kandinsky 2.2 inpainting decoder fine-tuned from " in card and "- inpainting\n" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    for name, path in (("path/to/prior", tiny["prior"]), ("path/to/whole", whole),
                       ("picture.png", root / "picture.png"), ("mask.png", root / "mask.png")):
        assert f'"{name}"' in code, name
        code = code.replace(f'"{name}"', f'"{path}"')
    code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32").replace(
        "embeds.negative_image_embeds)", "embeds.negative_image_embeds, height=64, width=64, num_inference_steps=2)")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert type(scope["decoder"]).__name__ == "KandinskyV22InpaintPipeline" and scope["image"].size == (64, 64)

    prior = KandinskyV22PriorPipeline.from_pretrained(tiny["prior"])
    pipe = AutoPipelineForInpainting.from_pretrained(
        whole, **{f"prior_{name}": component for name, component in prior.components.items()})
    image = pipe("a red circle", image=Image.open(root / "picture.png"), mask_image=noise_mask(5),
                 height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2).images[0]
    assert type(pipe).__name__ == "KandinskyV22InpaintCombinedPipeline" and image.size == (64, 64)


def spied_run(tiny, tiny_inpaint, folder, **flags):
    """A launched run of 8 steps (2 epochs of the 8 pictures), with a spy on what the UNet receives: per training
    step, (its epoch, the samples' indices, channels 4 to 9 of its input)."""
    from test_controlnet import SPY

    (folder / "spy.py").write_text(SPY)
    args = inpaint_args(tiny, tiny_inpaint, folder / "out", steps=8, **flags)
    launch(str(folder / "spy.py"), [DECODER_SCRIPT, *args],
           env=offline_env(SPY_OUTPUT=str(folder / "seen.pt"), KANDINSKY_TRAIN_TRACE=str(folder / "trace.jsonl")))
    trace = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
    seen = torch.load(folder / "seen.pt")
    assert [step["epoch"] for step in trace] == [0] * 4 + [1] * 4 and len(seen) == 8
    return [(step["epoch"], step["index"], inputs["sample"][:, 4:]) for step, inputs in zip(trace, seen)]


def test_in_training_steps_the_unet_gets_each_picture_with_its_mask_mirrored_with_it(tiny, tiny_inpaint, tmp_path):
    """Launched: 2 epochs of 8 pictures with their masks (an image folder), --random_flip, --cache_embeddings. In
    every step each sample's masked latents and keep are what KandinskyV22InpaintPipeline gives its UNet for that
    picture and mask (centre-cropped as training crops them), both mirrored or neither; both versions occur. The
    cache holds each version's mask on the latent grid, a byte per latent pixel, that the pipeline's keep grows from."""
    from diffusers import KandinskyV22InpaintPipeline
    from safetensors import safe_open

    from kandinsky_train.images import center_crop_resize
    from kandinsky_train.inpainting import grow
    from kandinsky_train.paired_pictures import MASK, resize_paired

    folder = image_folder(tiny_inpaint, tmp_path / "data")
    steps = spied_run(tiny, tiny_inpaint, tmp_path, **{
        "--train_data_dir": folder, "--dataset_name": None, "--mask_column": "mask", "--random_flip": True,
        "--cache_embeddings": True})
    pipe = KandinskyV22InpaintPipeline.from_pretrained(tiny_inpaint["decoder"])
    pipe.set_progress_bar_config(disable=True)
    expected = {}  # (index, mirrored) -> the pipeline's channels 4 to 9
    for index, (picture, mask) in enumerate(data_rows(tiny_inpaint)):
        # cropped and resized as training does (the mask as the pipeline does, tested above), then mirrored
        picture, mask = center_crop_resize(picture, 64), resize_paired(mask, 64, None, MASK)
        for mirrored in (0, 1):
            versions = [ImageOps.mirror(p) if mirrored else p for p in (picture, mask)]
            expected[index, mirrored] = pipeline_input(pipe, *versions)
    drawn = []
    for _, indices, inputs in steps:
        for index, built in zip(indices, inputs):
            matches = [m for m in (0, 1) if same_masked_input(built[None], expected[index, m])]
            assert len(matches) == 1, (index, matches)  # the mask mirrored exactly when its picture is
            drawn.append(matches[0])
    assert set(drawn) == {0, 1}

    parts = [safe_open(str(part), "pt") for part in (tmp_path / "out" / "embedding_cache").glob("*/part-*")]
    part = next(part for part in parts if "repaint" in part.keys())
    repaint = part.get_tensor("repaint")
    assert repaint.dtype == torch.uint8 and repaint.shape == (16, 1, 8, 8)
    versions = zip(part.get_tensor("index").tolist(), part.get_tensor("variant").tolist())
    for row, (index, variant) in enumerate(versions):
        assert torch.equal((~grow(repaint[row:row + 1])).float(), expected[index, variant][:, 4:5])


def test_in_training_steps_drawn_masks_are_the_samples_seeded_with_the_epoch(tiny, tiny_inpaint, tmp_path):
    """Launched, 2 epochs with drawn masks: the keep each sample's step gives the UNet is grown from the mask drawn
    from (--seed, that epoch, the sample), as the loop seeds it; a sample's masks differ between the epochs."""
    from kandinsky_train.diffusion import sample_seeds
    from kandinsky_train.inpainting import draw_masks, grow

    steps = spied_run(tiny, tiny_inpaint, tmp_path, **{"--random_mask_full_prob": 0.0})
    masks = {}
    for epoch, indices, inputs in steps:
        drawn = draw_masks(sample_seeds(0, epoch, indices).tolist(), (8, 8), 0.0, 0.35)
        assert torch.equal(inputs[:, 4:5], (~grow(drawn)).float()), (epoch, indices)
        masks.update({(epoch, index): mask for index, mask in zip(indices, drawn)})
    assert any(not torch.equal(masks[0, index], masks[1, index]) for index in range(8))


def test_a_run_with_drawn_masks_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tiny, tiny_inpaint, tmp_path):
    common = {"--checkpointing_steps": 3, "--random_mask_full_prob": 0.2, "--random_mask_stroke_prob": 0.4}
    whole = tmp_path / "whole"
    launch(DECODER_SCRIPT, inpaint_args(tiny, tiny_inpaint, whole, steps=6, **common))
    parts = resume_from(whole, "checkpoint-3", tmp_path / "parts")
    launch(DECODER_SCRIPT, inpaint_args(tiny, tiny_inpaint, parts, steps=6, **common, **{
        "--resume_from_checkpoint": "latest"}))
    assert max_change(weights(whole / "unet"), weights(parts / "unet")) == 0


def masked_loss(unet_folder, tiny, tiny_inpaint):
    """The noise prediction's mean squared error inside the repainted (grown) region, over the tiny set's pictures
    with their masks, at fixed timesteps and noise."""
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from kandinsky_train.images import center_crop_resize
    from kandinsky_train.inpainting import grow, repaint_pixels, to_latent_grid, unet_input

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    movq = VQModel.from_pretrained(tiny_inpaint["decoder"], subfolder="movq")
    processor = CLIPImageProcessor.from_pretrained(tiny["prior"], subfolder="image_processor")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny["prior"], subfolder="image_encoder")
    pictures, masks = zip(*[(center_crop_resize(picture, 64), center_crop_resize(mask, 64))  # as training does
                            for picture, mask in data_rows(tiny_inpaint)])
    pixels = torch.stack([torch.from_numpy(np.asarray(p, np.float32) / 127.5 - 1).permute(2, 0, 1) for p in pictures])
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        latents = movq.encode(pixels).latents
        repaint = to_latent_grid(torch.stack([repaint_pixels(np.asarray(m.convert("RGB"))) for m in masks]),
                                 latents.shape[-2:])
        embeds = encoder(**processor(list(pictures), return_tensors="pt")).image_embeds
        region = grow(repaint).expand_as(latents)
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(pictures),), t)
            scale = (1 - t / 1000) ** 0.5  # any fixed noising will do: both UNets see the same inputs
            noisy = scale * latents + (1 - scale ** 2) ** 0.5 * noise
            pred = unet(unet_input(noisy, latents, repaint), timesteps, None,
                        added_cond_kwargs={"image_embeds": embeds}).sample[:, :4]
            total += ((pred - noise)[region] ** 2).mean().item()
    return total / 5


# --- bad input -----------------------------------------------------------------------------------------------

def with_a_small_mask(tiny_inpaint, folder):
    """The tiny inpainting set with row 2's mask 32x32 (its picture is 80x64)."""
    return with_a_mask(tiny_inpaint, folder, 2, Image.new("L", (32, 32), 255))


def with_a_mask(tiny_inpaint, folder, row, mask):
    """The tiny inpainting set with row `row`'s mask replaced by `mask` (a PIL image, or None: no mask)."""
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(tiny_inpaint["data"] / "data" / "*.parquet"))["train"]
    table = table.cast_column("mask", datasets.Image(decode=False))
    masks = list(table["mask"])
    masks[row] = None
    if mask is not None:
        encoded = io.BytesIO()
        mask.save(encoded, "PNG")
        masks[row] = {"bytes": encoded.getvalue(), "path": None}
    table = table.remove_columns("mask").add_column("mask", masks).cast_column("mask", datasets.Image())
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def with_a_small_mask_file(tiny_inpaint, folder, number):
    """The tiny inpainting set as an image folder (`image_folder`) whose mask of picture `number` is 32x32."""
    image_folder(tiny_inpaint, folder)
    Image.new("L", (32, 32), 255).save(folder / "masks" / f"{number}.png")
    return folder


def strokes_on_transparency(size):
    """A paint tool's mask export: a white stroke on a transparent background (RGBA)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (4, 4, size[0] // 2, size[1] // 2))
    return mask


@pytest.mark.parametrize("overrides, message", [
    ({"--mask_column": "mask", "--dataset_name": "SMALL_MASK"},
     r"^error: 1 mask\(s\) of the training data are not the size of their picture \(row 2: picture 80x64, mask "
     r"32x32\); the mask is cropped and resized with the picture"),
    ({"--mask_column": "masks"}, r"^error: --mask_column 'masks' is not a column of the training data; its columns "
     r"are: image, text, mask\.$"),
    ({"--random_mask_full_prob": 1.5}, r"^error: --random_mask_full_prob 1.5: a share of the drawn masks, between 0 "
     r"and 1\.$"),
    ({"--random_mask_stroke_prob": -0.1}, r"^error: --random_mask_stroke_prob -0.1: a share"),
    ({"--random_mask_full_prob": 0.6, "--random_mask_stroke_prob": 0.5},
     r"^error: --random_mask_full_prob 0.6 and --random_mask_stroke_prob 0.5 add up to more than 1"),
    ({"--validation_prompts": ["a", "b"]}, r"^error: --validation_prompts on the inpainting decoder needs "
     r"--validation_image and --validation_mask_image"),
    ({"--validation_prompts": ["a", "b"], "--validation_image": "PICTURE"}, "needs --validation_image and "
     "--validation_mask_image"),
    ({"--validation_prompts": ["a", "b", "c"], "--validation_image": ["PICTURE", "PICTURE"],
      "--validation_mask_image": "PICTURE"},
     r"^error: --validation_image: 2 pictures for 3 --validation_prompts; give one per prompt, or one for all"),
    ({"--validation_prompts": ["a"], "--validation_image": "PICTURE", "--validation_mask_image": "MISSING"},
     r"^error: --validation_mask_image '.*missing\.png' cannot be read as a picture: .*No such file or directory"),
    ({"--validation_image": "PICTURE", "--validation_mask_image": "PICTURE"},
     r"^error: --validation_image pairs with --validation_prompts, which is not given\.$"),
    ({"--mask_column": "mask", "--dataset_name": "TRANSPARENT_MASK"},
     r"^error: 1 mask\(s\) of the training data have transparent pixels \(row 1\); KandinskyV22InpaintPipeline reads "
     r"a mask's colours alone \(diffusers' load_image drops the alpha\), so white strokes on transparency, or a mask "
     r"held in the alpha channel, would not mean what they show\. Save masks opaque: white where repainted, black "
     r"where kept\.$"),
    ({"--validation_prompts": ["a"], "--validation_image": "PICTURE", "--validation_mask_image": "TRANSPARENT"},
     r"^error: --validation_mask_image '.*transparent\.png' has transparent pixels: KandinskyV22InpaintPipeline reads "
     r"a mask's colours alone"),
    ({"--mask_column": "mask", "--dataset_name": "NO_MASK"},
     r"^error: 1 row\(s\) of the training data have no mask \(rows 4: column 'mask' is empty there\); give every "
     r"picture its mask, or drop those rows\.$"),
    ({"--mask_column": "mask", "--validation_data_dir": "SMALL_HELD_OUT"},
     r"^error: 1 mask\(s\) of the held-out data are not the size of their picture \(row 3: picture 64x64, mask "
     r"32x32\); the mask is cropped and resized with the picture"),
    ({"--mask_column": "image"}, r"^error: --mask_column 'image' is the picture column \(--image_column\): each "
     r"picture needs a mask of its own, in another column\.$"),
    ({"--validation_prompts": ["a", "b"], "--validation_image": ["PICTURE", "PICTURE"],
      "--validation_mask_image": ["PICTURE", "SMALL_FILE"]},
     r"^error: --validation_mask_image '.*small\.png' is 32x32 and its --validation_image '.*picture\.png' 64x64; a "
     r"mask is cropped and resized with its picture, so it must match it pixel for pixel\.$"),
])
def test_bad_inpainting_input_is_one_line_and_writes_nothing(tiny, tiny_inpaint, tmp_path, capsys, overrides,
                                                             message, no_model_loads):
    import train_text_to_image_decoder

    Image.new("RGB", (64, 64), "red").save(tmp_path / "picture.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    strokes_on_transparency((64, 64)).save(tmp_path / "transparent.png")
    names = {"SMALL_MASK": lambda: with_a_small_mask(tiny_inpaint, tmp_path / "small"),
             "TRANSPARENT_MASK": lambda: with_a_mask(tiny_inpaint, tmp_path / "small", 1,
                                                     strokes_on_transparency((80, 64))),
             "NO_MASK": lambda: with_a_mask(tiny_inpaint, tmp_path / "small", 4, None),
             "SMALL_HELD_OUT": lambda: with_a_small_mask_file(tiny_inpaint, tmp_path / "small", 3),
             "PICTURE": lambda: tmp_path / "picture.png", "MISSING": lambda: tmp_path / "missing.png",
             "SMALL_FILE": lambda: tmp_path / "small.png", "TRANSPARENT": lambda: tmp_path / "transparent.png"}

    def resolve(value):
        return [resolve(v) for v in value] if isinstance(value, list) else (
            names[value]() if value in names else value)

    args = inpaint_args(tiny, tiny_inpaint, tmp_path / "out", **{k: resolve(v) for k, v in overrides.items()})
    error = run_in_process(train_text_to_image_decoder, args, capsys)
    assert re.search(message, error_line(error, overrides)), error[-2000:]
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "small", ignore_errors=True)


def test_a_streamed_set_reads_its_masks_and_stops_at_one_of_another_size(tiny, tiny_inpaint, tmp_path, capsys):
    """--streaming reads the mask column beside the pictures (not as a caption, which skipped every sample); a
    streamed mask of another size than its picture, unchecked before, stops the run in one line when it comes."""
    import train_text_to_image_decoder

    small = with_a_small_mask(tiny_inpaint, tmp_path / "small")
    args = inpaint_args(tiny, tiny_inpaint, tmp_path / "out", steps=8, **{
        "--mask_column": "mask", "--streaming": True, "--dataset_name": small})
    error = run_in_process(train_text_to_image_decoder, args, capsys)
    # (the line follows the progress bar's, which main_guard does not end first)
    assert re.findall(r"error: .*", error) == ["error: A mask of 32x32 pairs with a picture stored in the data set of "
                                               "80x64 (column 'mask'); it must match its picture pixel for pixel."]


def test_a_streamed_csv_reads_its_mask_column_and_names_the_picture_whose_mask_is_missing(tiny, tiny_inpaint, tmp_path,
                                                                                          capsys):
    """A streamed CSV names its columns only in its rows: its --mask_column is taken, its paths are resolved against
    its own folder, the first rows train, and the row without a mask stops the run in one line naming its picture."""
    import train_text_to_image_decoder

    folder = image_folder(tiny_inpaint, tmp_path / "data")
    lines = ["image,mask"] + [f"../data/{n}.png,../data/masks/{n}.png" if n != 5 else f"../data/{n}.png,"
                              for n in range(8)]
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text("\n".join(lines) + "\n")
    args = inpaint_args(tiny, tiny_inpaint, tmp_path / "out", steps=8, **{
        "--mask_column": "mask", "--streaming": True, "--dataset_name": tmp_path / "csv",
        "--shuffle_buffer_size": 1})
    error = run_in_process(train_text_to_image_decoder, args, capsys)
    assert re.findall(r"error: .*", error) == [
        f"error: The mask of the picture {str(folder / '5.png')!r} is missing (column 'mask' is empty in its row); "
        "give every picture its mask, or drop that row."], error[-3000:]


def test_masks_that_are_all_black_are_warned_of(tiny, tiny_inpaint, tmp_path):
    """Masks with nothing to repaint (read as the pipeline reads them) train the decoder to copy its input: said
    before any model loads; the tiny set's masks, which repaint, are not."""
    import datasets

    import train_text_to_image_decoder as script
    from conftest import warnings_seen
    from kandinsky_train import decoders

    folder = image_folder(tiny_inpaint, tmp_path / "data")
    args = script.parse_args(list(map(str, inpaint_args(tiny, tiny_inpaint, "-", **{
        "--mask_column": "mask", "--train_data_dir": folder, "--dataset_name": None}))))
    said = []
    for _ in ("repainting", "black"):
        data = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
        with warnings_seen() as seen:
            decoders.Inpainting(args).check_data(data, None)
        said.append([message for message in seen if "Every mask" in message])
        for mask in (folder / "masks").iterdir():
            Image.new("L", Image.open(mask).size, 100).save(mask)  # grey below 0.5: kept
    assert said[0] == []
    assert said[1] == ["Every mask in column 'mask' is black (nothing to repaint, read as the pipeline reads a mask: "
                       "grey at 0.5 or more is repainted): the inpainting decoder will learn to copy the picture. "
                       "Check --mask_column and the masks (white = repaint)."]


def test_a_mask_edited_in_place_builds_its_cache_entry_again(tiny, tiny_inpaint, tmp_path):
    """--cache_embeddings caches the masks with the latents: masks rewritten in place at the same byte size, their
    modification time put back (as cp -p and rsync -a leave it), are read again, not taken from the cache; the
    CLIP image embeddings, which do not depend on them, are reused."""
    import os

    folder = image_folder(tiny_inpaint, tmp_path / "data")
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace(".png\"}", ".bmp\"}"))  # BMP: the same size whatever the pixels
    for number in range(8):
        Image.open(folder / "masks" / f"{number}.png").save(folder / "masks" / f"{number}.bmp")
    common = {"--train_data_dir": folder, "--dataset_name": None, "--mask_column": "mask",
              "--cache_embeddings": True, "--embedding_cache_dir": tmp_path / "cache"}
    launch(DECODER_SCRIPT, inpaint_args(tiny, tiny_inpaint, tmp_path / "first", steps=1, **common))
    for number in range(8):
        mask = folder / "masks" / f"{number}.bmp"
        before = mask.stat()
        ImageOps.mirror(Image.open(mask)).save(mask)
        os.utime(mask, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (mask.stat().st_size, mask.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = launch(DECODER_SCRIPT, inpaint_args(tiny, tiny_inpaint, tmp_path / "second", steps=1, **common))
    text = second.stdout + second.stderr
    assert "Reusing cached CLIP image embeddings" in text and "Reusing cached frozen outputs" not in text, text[-3000:]
