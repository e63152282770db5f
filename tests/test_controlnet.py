"""The depth-ControlNet decoder (issue 21): the hint that reaches the UNet in training is the one the pipeline passes
for the same picture, mirrored and bucketed with it; a run resumes exactly, cached or not; the output and a LoRA
adapter load in KandinskyV22ControlnetPipeline and render from a hint; bad input is one line."""

import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open

from conftest import DECODER_SCRIPT, REPO, base_args, checkpoints, launch, offline_env
from test_robustness import assert_same_state, error_line, run_in_process, state_of

# Records the input (`sample`), hint and image embedding of every training forward pass of the UNet, then runs the
# script given (test_inpainting.py's spy too).
SPY = '''
import atexit, os, runpy, sys
import torch
from diffusers import UNet2DConditionModel

seen, forward = [], UNet2DConditionModel.forward

def spy(self, *args, added_cond_kwargs=None, **kwargs):
    if torch.is_grad_enabled():  # training steps, not validation
        seen.append({key: value.detach().clone() for key, value in {"sample": args[0], **added_cond_kwargs}.items()})
    return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

UNet2DConditionModel.forward = spy
atexit.register(lambda: torch.save(seen, os.environ["SPY_OUTPUT"]))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def controlnet_args(tiny, tiny_controlnet, output_dir, steps=4, **overrides):
    return base_args(tiny, output_dir, steps, **{
        "--pretrained_decoder_model_name_or_path": tiny_controlnet["decoder"], "--train_data_dir": None,
        "--dataset_name": tiny_controlnet["data"], **overrides})


def rows(data):
    import datasets

    return datasets.load_dataset("parquet", data_files=str(data / "data" / "*.parquet"), split="train")


@pytest.fixture(scope="module")
def hint_file(tiny_controlnet, tmp_path_factory):
    """The conditioning image of the tiny set's first picture, as a file (a validation or inference hint)."""
    path = tmp_path_factory.mktemp("hint") / "depth.png"
    rows(tiny_controlnet["data"])[0]["conditioning_image"].save(path)
    return path


def pipeline_hint(pipe, hint_picture):
    """What KandinskyV22ControlnetPipeline hands its UNet for a hint picture converted as its documentation does
    (uint8 HWC -> float / 255 -> CHW)."""
    from diffusers import UNet2DConditionModel

    hint = torch.from_numpy(np.array(hint_picture)).float() / 255.0
    received, forward = [], UNet2DConditionModel.forward

    def spy(self, *args, added_cond_kwargs=None, **kwargs):
        received.append(added_cond_kwargs["hint"])
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    UNet2DConditionModel.forward = spy
    try:
        pipe(image_embeds=torch.randn(1, 32), negative_image_embeds=torch.zeros(1, 32),
             hint=hint.permute(2, 0, 1)[None], height=hint_picture.height, width=hint_picture.width,
             num_inference_steps=1, output_type="pt")
    finally:
        UNet2DConditionModel.forward = forward
    return received[0][:1]  # the guided half is the same hint again


def test_the_hint_in_training_is_the_pipelines_mirrored_with_the_picture_and_a_lora_adapter_renders(
        tiny, tiny_controlnet, hint_file, tmp_path):
    """One epoch of 8 pictures of three shapes, --random_flip, LoRA: each hint the UNet got equals what the pipeline
    passes for that picture's conditioning image, centre-cropped as the picture is, or for its mirror exactly when
    the CLIP image embedding is the mirrored picture's. The adapter (attention only: the hint block stays the
    base's) loads into the pipeline, changes what it renders, and the card's code runs."""
    from diffusers import KandinskyV22ControlnetPipeline
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from kandinsky_train.images import center_crop_resize
    from kandinsky_train.stage import clip_pixels

    spy, out = tmp_path / "spy.py", tmp_path / "out"
    spy.write_text(SPY)
    launch(str(spy), [DECODER_SCRIPT, *controlnet_args(tiny, tiny_controlnet, out, steps=4, **{
        "--random_flip": True, "--use_lora": True})],
        env=offline_env(SPY_OUTPUT=str(tmp_path / "seen.pt"), KANDINSKY_TRAIN_TRACE=str(tmp_path / "trace.jsonl")))
    seen = torch.load(tmp_path / "seen.pt")
    order = [i for line in (tmp_path / "trace.jsonl").read_text().splitlines() for i in json.loads(line)["index"]]
    assert sorted(order) == list(range(8)) and len(seen) == 4
    hints = torch.cat([step["hint"] for step in seen])
    embeds = torch.cat([step["image_embeds"] for step in seen])

    pipe = KandinskyV22ControlnetPipeline.from_pretrained(tiny_controlnet["decoder"])
    pipe.set_progress_bar_config(disable=True)
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny["prior"], subfolder="image_encoder")
    processor = CLIPImageProcessor.from_pretrained(tiny["prior"], subfolder="image_processor")
    data, mirrored = rows(tiny_controlnet["data"]), []
    for index, hint, embed in zip(order, hints, embeds):
        picture, hint_picture = data[index]["image"].convert("RGB"), data[index]["conditioning_image"].convert("RGB")
        with torch.no_grad():
            versions = encoder(torch.stack([clip_pixels(processor, picture),
                                            clip_pixels(processor, ImageOps.mirror(picture))])).image_embeds
        flip = bool((versions[1] - embed).norm() < (versions[0] - embed).norm())
        hint_picture = center_crop_resize(hint_picture, 64, Image.BICUBIC)  # as the picture: the set's vary
        expected = pipeline_hint(pipe, ImageOps.mirror(hint_picture) if flip else hint_picture)
        assert hint.dtype == torch.float32 and torch.equal(hint[None], expected), (index, flip)
        mirrored.append(flip)
    assert True in mirrored and False in mirrored  # both versions were drawn

    adapter = load_file(out / "pytorch_lora_weights.safetensors")
    assert adapter and not any("input_hint_block" in key for key in adapter)
    hint = torch.from_numpy(np.array(Image.open(hint_file))).permute(2, 0, 1)[None] / 255
    call = dict(image_embeds=torch.randn(1, 32, generator=torch.Generator().manual_seed(0)),
                negative_image_embeds=torch.zeros(1, 32), hint=hint, height=64, width=64, num_inference_steps=2,
                output_type="pt")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.unet.load_lora_adapter(str(out), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert (before - after).abs().max() > 1e-6, "the adapter did not change the output"
    card = ModelCard.load(out / "README.md")
    assert "controlnet" in card.data.tags and card.text.startswith("\n# Kandinsky 2.2 depth-ControlNet decoder LoRA")
    card_renders(card.text, tiny, tiny_controlnet, out, hint_file)


def card_renders(card, tiny, tiny_controlnet, out, hint_file):
    """The model card's code as a user runs it, on the CPU, with the tiny models and a hint of the tiny set."""
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "KandinskyV22ControlnetPipeline.from_pretrained" in code and "hint=hint" in code
    for placeholder, path in (("path/to/prior", tiny["prior"]), ("path/to/decoder", tiny_controlnet["decoder"]),
                              (f"path/to/{out.name}", out), ("depth.png", hint_file)):
        code = code.replace(f'"{placeholder}"', f'"{path}"')
    scope = {}
    exec(on_the_cpu(code), scope)
    assert scope["image"].size == (64, 64)


def on_the_cpu(code):
    """Inference code made to run here: on the CPU in float32, at 64 pixels, 2 denoising steps (not 100)."""
    code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32").replace("768", "64")
    assert code.count(").images[0]") == 1
    return code.replace(").images[0]", ", num_inference_steps=2).images[0]")


def paired_folder(folder, sizes):
    """An image folder whose metadata pairs each picture with a conditioning image of its size
    (`conditioning_image_file_name`, which datasets reads as an Image column): landscape, portrait and square."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    lines = []
    for i, (width, height) in enumerate(sizes):
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        depth = np.linspace(0, 255, width, dtype=np.float32)[None].repeat(height, 0) * rng.uniform(0.3, 1)
        picture.save(folder / f"{i}.png")
        Image.fromarray(depth.astype(np.uint8)).save(folder / f"{i}-depth.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"{i}-depth.png",
                                 "text": f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


def test_a_bucketed_run_resumed_mid_epoch_with_the_cache_ends_as_the_whole_run_and_its_output_renders(
        tiny, tiny_controlnet, tmp_path):
    """8 pictures of three shapes in buckets, batch 2, --random_flip: checkpoint-3 lies mid-epoch. A run resumed
    from it with --cache_embeddings (the hints cached as uint8) ends with the uninterrupted, uncached run's weights:
    resuming and caching change nothing. The held-out set (its own hints) is evaluated; the saved pipeline renders
    from a hint of another shape, and validation renders each prompt with its hint."""
    from diffusers import KandinskyV22ControlnetPipeline

    data = paired_folder(tmp_path / "data", [(96, 64)] * 3 + [(64, 96)] * 3 + [(64, 64)] * 2)
    held_out = shutil.copytree(data, tmp_path / "held_out")
    common = {"--dataset_name": None, "--train_data_dir": data, "--enable_bucket": True, "--random_flip": True,
              "--checkpointing_steps": 3, "--validation_data_dir": held_out}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    hints = [data / "0-depth.png", data / "3-depth.png"]
    proc = launch(DECODER_SCRIPT, controlnet_args(tiny, tiny_controlnet, whole, steps=6, **common, **{
        "--validation_prompts": ["a red circle", "a blue square"], "--validation_image": hints}))
    # steps, not their order: a line printed while the step bar shows goes to stderr, one after it to stdout
    evaluated = sorted(int(step) for step in re.findall(r"Held-out evaluation at step (\d+): eval_loss",
                                                         proc.stdout + proc.stderr))
    assert evaluated[0] == 0 and evaluated[-1] == 6, evaluated
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    launch(DECODER_SCRIPT, controlnet_args(tiny, tiny_controlnet, resumed, steps=6, **common, **{
        "--resume_from_checkpoint": "latest", "--cache_embeddings": True}))
    assert checkpoints(resumed) == ["checkpoint-3", "checkpoint-6"]
    assert_same_state(state_of(whole / "checkpoint-6", "unet"), state_of(resumed / "checkpoint-6", "unet"), ema=False)
    parts = [safe_open(str(part), "pt") for part in (resumed / "embedding_cache").glob("*/part-*.safetensors")]
    stored = [part.get_tensor("hint") for part in parts if "hint" in part.keys()]
    assert stored and all(hint.dtype == torch.uint8 for hint in stored)

    pipe = KandinskyV22ControlnetPipeline.from_pretrained(whole)
    depth = torch.from_numpy(np.array(Image.open(data / "0-depth.png").convert("RGB").resize((128, 64))))
    image = pipe(image_embeds=torch.randn(1, 32), negative_image_embeds=torch.zeros(1, 32), height=64, width=128,
                 hint=depth.permute(2, 0, 1)[None] / 255, num_inference_steps=2).images[0]
    assert image.size == (128, 64)
    assert len(list((whole / "validation").glob("step-000006-*.png"))) == 2
    readme_recipe_renders(tiny, whole, data / "0-depth.png")


def readme_recipe_renders(tiny, output, depth):
    """The README's ControlNet inference code as a user runs it, on the CPU, at a tiny size, with the tiny prior."""
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("### The depth-ControlNet decoder"):], re.S).group(1)
    for name, path in (("kandinsky-community/kandinsky-2-2-prior", tiny["prior"]),
                       ("kandi2-controlnet-rooms", output), ("room-depth.png", depth)):
        assert f'"{name}"' in code
        code = code.replace(f'"{name}"', f'"{path}"')
    scope = {}
    exec(on_the_cpu(code), scope)
    assert scope["image"].size == (64, 64)


def cut_out(picture):
    """A depth map with a corner cut out on transparency (RGBA, or LA for a grey one)."""
    alpha = Image.new("L", picture.size, 255)
    alpha.paste(0, (0, 0, 8, 8))
    cut = picture.convert("LA" if picture.mode == "L" else "RGBA")
    cut.putalpha(alpha)
    return cut


@pytest.fixture(scope="module")
def odd_sized(tiny_controlnet, tmp_path_factory):
    """The tiny ControlNet set with row 5's conditioning image at 32x32 ("odd"), and with row 2's not a picture
    ("unreadable")."""
    import datasets

    root = tmp_path_factory.mktemp("odd-sized")
    data = rows(tiny_controlnet["data"]).cast_column("conditioning_image", datasets.Image(decode=False))
    small = io.BytesIO()
    Image.open(io.BytesIO(data[5]["conditioning_image"]["bytes"])).resize((32, 32)).save(small, "PNG")
    transparent = io.BytesIO()
    cut_out(Image.open(io.BytesIO(data[3]["conditioning_image"]["bytes"]))).save(transparent, "PNG")
    for folder, row, cell in (("odd", 5, small.getvalue()), ("unreadable", 2, b"not a picture"),
                              ("transparent", 3, transparent.getvalue())):
        column = [{"bytes": cell, "path": None} if i == row else value
                  for i, value in enumerate(data["conditioning_image"])]
        changed = data.remove_columns("conditioning_image").add_column("conditioning_image", column,
                                                                       feature=datasets.Image())
        (root / folder / "data").mkdir(parents=True)
        changed.to_parquet(str(root / folder / "data" / "train.parquet"))
    return root


def test_a_streamed_set_trains_on_its_hints_until_one_of_another_size_stops_it_in_one_line(
        tiny, tiny_controlnet, odd_sized, tmp_path, capsys, monkeypatch):
    """--streaming checks each hint's size as its row comes: rows 0 to 3 train first (two optimizer steps, in the
    file's order), then row 5 stops the run. In this process: a launch would cost more than the two steps."""
    import train_text_to_image_decoder

    from kandinsky_train import faults

    monkeypatch.setattr(faults, "_TRACE", str(tmp_path / "trace.jsonl"))  # test hook: the micro-batches' samples
    steps, adamw_step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or adamw_step(self, *a, **k))
    args = controlnet_args(tiny, tiny_controlnet, tmp_path / "out", steps=4, **{
        "--dataset_name": odd_sized / "odd", "--streaming": True, "--shuffle_buffer_size": 1})
    error = run_in_process(train_text_to_image_decoder, args, capsys)
    trace = tmp_path / "trace.jsonl"
    trained = [json.loads(line)["index"] for line in trace.read_text().splitlines()] if trace.exists() else []
    # (a streamed sample's index is its key in the stream, not its row)
    assert [len(batch) for batch in trained] == [2, 2] and len({i for b in trained for i in b}) == 4, trained
    assert len(steps) == 2
    lines = [line for line in error.splitlines() if "error: " in line]
    assert len(lines) == 1 and lines[0].endswith(
        "error: A conditioning image of 32x32 pairs with a picture stored in the data set of 80x64 (column "
        "'conditioning_image'); it must match its picture pixel for pixel."), error[-3000:]


@pytest.mark.parametrize("case, overrides, message", [
    ("odd size", {}, "1 conditioning image(s) of the training data are not the size of their picture (row 5: "
     "picture 80x64, conditioning image 32x32); the conditioning image is cropped and resized with the picture, so "
     "it must match it pixel for pixel."),
    ("unreadable", {}, "1 conditioning image(s) of the training data cannot be read (row 2: cannot identify image "
     "file"),
    ("missing column", {"--conditioning_image_column": "depth"},
     "--conditioning_image_column 'depth' is not a column of the training data; its columns are: image, text, "
     "conditioning_image."),
    ("held-out hint of another size", {"--validation_dataset_name": "ODD"},
     "1 conditioning image(s) of the held-out data are not the size of their picture (row 5: picture 80x64, "
     "conditioning image 32x32)"),
    ("held-out set without hints", {"--validation_data_dir": "IMAGES"},
     "--conditioning_image_column 'conditioning_image' is not a column of the held-out data; its columns are: "),
    ("no hint", {"--validation_prompts": "a red circle"},
     "The ControlNet decoder renders --validation_prompts from a hint: give --validation_image, the conditioning "
     "image (depth map) of each prompt, or one for all of them."),
    ("counts", {"--validation_prompts": ["a", "b", "c"], "--validation_image": ["HINT", "HINT"]},
     "--validation_image: 2 pictures for 3 --validation_prompts; give one per prompt, or one for all of them."),
    ("unreadable hint", {"--validation_prompts": "a", "--validation_image": "NOTES"},
     "--validation_image 'NOTES' cannot be read as a picture: "),
    ("no prompts", {"--validation_image": "HINT"}, "--validation_image pairs with --validation_prompts, which is not "
     "given."),
    ("transparent", {}, "1 conditioning image(s) of the training data have transparent pixels (row 3); training "
     "would put them on white, and diffusers' load_image drops the alpha at inference. Save hints opaque."),
    ("transparent hint", {"--validation_prompts": "a", "--validation_image": "TRANSPARENT"},
     "--validation_image 'TRANSPARENT' has transparent pixels: training would put them on white"),
    ("hint column is the picture column", {"--conditioning_image_column": "image"},
     "--conditioning_image_column 'image' is the picture column (--image_column): each picture needs a hint of its "
     "own, in another column."),
])
def test_bad_controlnet_input_is_one_line_and_writes_nothing(tiny, tiny_controlnet, odd_sized, hint_file, tmp_path,
                                                             capsys, case, overrides, message, no_model_loads):
    import train_text_to_image_decoder

    notes, transparent = tmp_path / "notes.png", tmp_path / "transparent.png"
    notes.write_text("not a picture")
    cut_out(Image.open(hint_file).convert("L")).save(transparent)
    files = {"HINT": str(hint_file), "NOTES": str(notes), "IMAGES": str(tiny["images"]),
             "TRANSPARENT": str(transparent), "ODD": str(odd_sized / "odd")}
    overrides = {key: [files.get(v, v) for v in value] if isinstance(value, list) else files.get(value, value)
                 for key, value in overrides.items()}
    message = message.replace("'NOTES'", repr(str(notes))).replace("'TRANSPARENT'", repr(str(transparent)))
    if case in ("odd size", "unreadable", "transparent"):
        overrides["--dataset_name"] = odd_sized / {"odd size": "odd"}.get(case, case)
    args = controlnet_args(tiny, tiny_controlnet, tmp_path / "out", **overrides)
    error = run_in_process(train_text_to_image_decoder, args, capsys)
    assert error_line(error, case).startswith(f"error: {message}"), error[-2000:]
    assert not (tmp_path / "out").exists()


def test_conditioning_dropout_drops_the_image_embedding_and_keeps_the_hint(tiny, tiny_controlnet, tmp_path):
    """--conditioning_dropout_prob, in a launched run with the spy UNet: a dropped sample reaches the UNet with the
    embedding of an all-zero image (what the script drops to) and still with its own hint; the others with their
    own embedding."""
    from transformers import CLIPVisionModelWithProjection

    from kandinsky_train.images import center_crop_resize

    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    launch(str(spy), [DECODER_SCRIPT, *controlnet_args(tiny, tiny_controlnet, tmp_path / "out", steps=4, **{
        "--conditioning_dropout_prob": 0.5})],
        env=offline_env(SPY_OUTPUT=str(tmp_path / "seen.pt"), KANDINSKY_TRAIN_TRACE=str(tmp_path / "trace.jsonl")))
    seen = torch.load(tmp_path / "seen.pt")
    order = [i for line in (tmp_path / "trace.jsonl").read_text().splitlines() for i in json.loads(line)["index"]]
    hints = torch.cat([step["hint"] for step in seen])
    embeds = torch.cat([step["image_embeds"] for step in seen])
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny["prior"], subfolder="image_encoder")
    with torch.no_grad():
        side = encoder.config.image_size  # CLIP's crop of the tiny encoder
        zero = encoder(torch.zeros(1, 3, side, side)).image_embeds[0]
    data, dropped = rows(tiny_controlnet["data"]), []
    for index, hint, embed in zip(order, hints, embeds):
        hint_picture = center_crop_resize(data[index]["conditioning_image"].convert("RGB"), 64, Image.BICUBIC)
        expected = torch.from_numpy(np.array(hint_picture)).float().permute(2, 0, 1) / 255.0
        assert torch.equal(hint, expected), index  # dropped or not
        dropped.append(bool(torch.allclose(embed, zero, atol=1e-5)))
    assert len(order) == 8 and True in dropped and False in dropped, dropped
    kept = embeds[[not d for d in dropped]]
    assert not any(torch.allclose(e, zero, atol=1e-3) for e in kept)


@pytest.fixture(scope="module")
def hint_is_picture(tiny_controlnet, tmp_path_factory):
    """The tiny ControlNet decoder with a hint block whose features vary with the hint, as a trained one's do (the
    random tiny one's differ by about 1e-4 between hints, which no short run overcomes), and the tiny set with each
    picture as its own hint: a hint that determines the picture."""
    import datasets
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("hint-is-picture")
    shutil.copytree(tiny_controlnet["decoder"], root / "decoder")
    unet = UNet2DConditionModel.from_pretrained(root / "decoder", subfolder="unet")
    torch.manual_seed(0)
    for layer in unet.add_embedding.input_hint_block:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    unet.save_pretrained(root / "decoder" / "unet")
    data = rows(tiny_controlnet["data"]).cast_column("image", datasets.Image(decode=False))
    data = data.remove_columns("conditioning_image").add_column("conditioning_image", data["image"],
                                                                feature=datasets.Image())
    data = data.cast_column("image", datasets.Image())
    (root / "set" / "data").mkdir(parents=True)
    data.to_parquet(str(root / "set" / "data" / "train.parquet"))
    return {"decoder": root / "decoder", "data": root / "set"}


def hint_losses(decoder, tiny, data):
    """The UNet's noise-prediction loss on the set's pictures with their own hints and with each one's neighbour's
    (the same noise and timesteps)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from kandinsky_train.images import center_crop_resize

    unet = UNet2DConditionModel.from_pretrained(decoder, subfolder="unet").eval()
    movq = VQModel.from_pretrained(tiny["decoder"], subfolder="movq")
    scheduler = DDPMScheduler.from_pretrained(tiny["decoder"], subfolder="scheduler")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny["prior"], subfolder="image_encoder")
    processor = CLIPImageProcessor.from_pretrained(tiny["prior"], subfolder="image_processor")
    pictures = [row["image"].convert("RGB") for row in rows(data)]
    crops = np.stack([np.asarray(center_crop_resize(picture, 64, Image.BICUBIC)) for picture in pictures])
    crops = torch.from_numpy(crops).permute(0, 3, 1, 2)
    generator, losses = torch.Generator().manual_seed(0), {}
    with torch.no_grad():
        latents = movq.encode(crops.float() / 127.5 - 1).latents
        embeds = encoder(processor(pictures, return_tensors="pt").pixel_values).image_embeds
        draws = [(torch.randn(latents.shape, generator=generator),
                  torch.randint(0, 1000, (len(latents),), generator=generator)) for _ in range(8)]
        for name, hints in (("own", crops), ("neighbour's", crops.roll(1, 0))):
            losses[name] = sum(torch.nn.functional.mse_loss(unet(
                scheduler.add_noise(latents, noise, timesteps), timesteps, None,
                added_cond_kwargs={"image_embeds": embeds, "hint": hints.float() / 255}).sample[:, :4], noise).item()
                for noise, timesteps in draws) / len(draws)
    return losses["own"], losses["neighbour's"]


def test_a_short_fine_tune_learns_to_follow_the_hint(tiny, tiny_controlnet, hint_is_picture, tmp_path):
    """Before training, a picture's own hint and another's give the same loss; after 80 steps (the image embedding
    dropped half the time, so the hint is what tells the pictures apart), the own hint's is clearly lower."""
    own, other = hint_losses(hint_is_picture["decoder"], tiny, hint_is_picture["data"])
    assert abs(other - own) < 0.01 * own, (own, other)
    launch(DECODER_SCRIPT, controlnet_args(tiny, hint_is_picture, tmp_path, steps=80, **{
        "--train_batch_size": 8, "--learning_rate": 3e-3, "--conditioning_dropout_prob": 0.5,
        "--cache_embeddings": True}))
    own, other = hint_losses(tmp_path, tiny, hint_is_picture["data"])
    assert other - own > 0.04 * own, (own, other)


def test_the_published_code_and_validation_give_a_16_bit_depth_map_as_training_gave_it(tiny, tiny_controlnet, tmp_path):
    """A 16-bit depth map (scaled from 0-65535 in training): the model card's code hands the pipeline the hint that
    training gave the UNet (load_image alone would clip it at 255, almost all white), and so does validation; the
    README's code reads it the same way."""
    import train_text_to_image_decoder as script
    from kandinsky_train import decoders

    depth = tmp_path / "depth.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(depth)
    assert Image.open(depth).mode in ("I;16", "I")
    args = script.parse_args(["--resolution", "64", "--validation_prompts", "a room", "--validation_image", str(depth)])
    decoder = decoders.ControlNet(args)
    decoder.check_flags()
    row = {"image": "picture.png", "conditioning_image": str(depth)}
    pixels = decoder.sample_inputs(Image.new("RGB", (64, 64)), row, 64, Image.BICUBIC)["hint"]
    trained = decoder.unet_inputs(torch.zeros(1, 4, 8, 8), decoder.encode_inputs({"hint": pixels[None]}, None))[1]
    setup, _ = decoder.snippet_inputs()
    code = "\n".join(setup).replace('"depth.png"', repr(str(depth))).replace('.to("cuda", torch.float16)', "")
    scope = {"torch": torch}
    exec(code, scope)
    assert 0.2 < trained["hint"].mean() < 0.8
    assert torch.equal(scope["hint"], trained["hint"])
    assert torch.equal(decoder.validation_inputs(0, (64, 64))["hint"], trained["hint"])
    readme = (REPO / "README.md").read_text()
    recipe = re.search(r"```python\n(.*?)```", readme[readme.index("### The depth-ControlNet decoder"):], re.S).group(1)
    assert all(line in recipe.splitlines() for line in setup if line.startswith(("def ", " ")))
    readme_recipe_renders(tiny, tiny_controlnet["decoder"], depth)  # and it runs
