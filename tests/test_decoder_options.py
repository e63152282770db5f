"""The Stable Diffusion script's options on the decoder (issue 13), in-process: each changes what it should
(--random_flip: the mirror is what the model sees; --noise_offset, --input_perturbation, --prediction_type: the
noisy input and the target; --image_interpolation_mode: the resize), the defaults change nothing, bad values are
one-line errors before any model loads, and the prior refuses every decoder option by name.
(tests/test_buckets.py trains with all of them end to end and checks the saved v-prediction pipeline.)"""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train_text_to_image_decoder as decoder
import train_text_to_image_prior as prior
from kandinsky_train.cli import DECODER_OPTIONS
from kandinsky_train.decoders import TextToImage
from kandinsky_train.errors import UserError
from kandinsky_train.images import RESAMPLING, center_crop_resize

from conftest import base_args

VALUES = {"--enable_bucket": [], "--min_bucket_reso": ["32"], "--max_bucket_reso": ["128"],
          "--bucket_reso_steps": ["16"], "--random_flip": [], "--noise_offset": ["0.1"],
          "--input_perturbation": ["0.1"], "--prediction_type": ["v_prediction"],
          "--image_interpolation_mode": ["lanczos"], "--validation_resolutions": ["64x128"]}


def test_the_prior_refuses_every_decoder_option_by_name(tiny, tmp_path, no_model_loads):
    assert set(VALUES) == set(DECODER_OPTIONS)
    base = [str(a) for a in base_args(tiny, tmp_path / "out")]
    for flag, value in VALUES.items():
        with pytest.raises(UserError) as raised:
            prior.main(prior.parse_args(base + [flag, *value]))
        assert str(raised.value).startswith(f"{flag} is a decoder option: the prior learns the CLIP image embedding")
        assert "train_text_to_image_decoder.py" in str(raised.value)
        decoder.parse_args(base + [flag, *value])  # the decoder takes it
    assert not (tmp_path / "out").exists()  # refused before anything was written
    # its --help says why, and lists no default for flags it does not use
    from test_cli import parser_of

    help_text = re.sub(r"\s+", " ", parser_of(prior).format_help())
    assert "decoder options (refused here): The prior trains on CLIP's own 224 px centre crop" in help_text
    assert "SUPPRESS" not in help_text


@pytest.mark.parametrize("overrides,message", [
    ({"--min_bucket_reso": 32}, "--min_bucket_reso needs --enable_bucket"),
    ({"--enable_bucket": True, "--bucket_reso_steps": 8},
     "--bucket_reso_steps must be a multiple of 16, got 8: the decoder's MoVQ and UNet together divide"),
    ({"--noise_offset": -0.1}, "--noise_offset must be at least 0, got -0.1"),
    ({"--validation_resolutions": "64x128,wide"}, "--validation_resolutions takes WIDTHxHEIGHT shapes"),
    ({"--validation_resolutions": "64x96"},
     "--validation_resolutions 64x96: the pipeline renders sides in multiples of 64"),
])
def test_bad_decoder_options_are_one_line_errors_before_any_model_loads(overrides, message, tiny, tmp_path,
                                                                         no_model_loads):
    with pytest.raises(UserError, match=re.escape(message)):
        decoder.main(decoder.parse_args([str(a) for a in base_args(tiny, tmp_path / "out", **overrides)]))
    assert not (tmp_path / "out").exists()


def picture(width=67, height=41):
    """Noise with a bright left edge: mirrors and resampling filters are easy to tell apart."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:, :5] = 255
    return Image.fromarray(pixels)


def test_a_flipped_sample_is_the_mirror_of_what_the_model_sees_unflipped(tiny):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny["prior"], subfolder="image_processor")
    for size in (64, (80, 48)):
        plain = decoder.decoder_sample(picture(), size, Image.BICUBIC, processor)
        flipped = decoder.decoder_sample(picture(), size, Image.BICUBIC, processor, flip=True)
        for key in ("pixel_values", "clip_pixel_values"):
            assert torch.equal(flipped[key], plain[key].flip(-1)) and not torch.equal(flipped[key], plain[key])
        assert plain["pixel_values"].shape[1:] == ((48, 80) if size == (80, 48) else (64, 64))
    # the bright left edge (kept by the 80x48 crop) is on the right of the mirror
    assert plain["pixel_values"][:, :, 0].min() == 1.0 and flipped["pixel_values"][:, :, -1].min() == 1.0


def test_random_flip_mirrors_half_the_pictures_drawn_per_epoch_from_the_seed():
    from kandinsky_train.data import Variants

    variants = Variants([2] * 1000, seed=0)
    draws = []
    for epoch in (0, 1, 0):
        variants.set_epoch(epoch)
        draws.append([variants.pick(index) for index in range(1000)])
    assert draws[0] == draws[2] and draws[0] != draws[1]  # a pure function of (seed, epoch, index)
    assert all(400 < sum(d) < 600 for d in draws[:2])
    other = Variants([2] * 1000, seed=1)
    assert [other.pick(index) for index in range(1000)] != draws[0]
    assert Variants(None, seed=0).pick(7) == 0  # without --random_flip: the picture as it is


def test_interpolation_modes_are_torchvisions_and_bicubic_keeps_the_reference_transform():
    assert list(RESAMPLING) == ["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    image = picture(150, 100)
    # the decoder's transform before the flag existed: a centred square crop, then bicubic with reducing_gap=1
    reference = image.crop((25, 0, 125, 100)).resize((64, 64), resample=Image.BICUBIC, reducing_gap=1)
    assert np.array_equal(np.asarray(center_crop_resize(image, 64, RESAMPLING["bicubic"])), np.asarray(reference))
    assert decoder.parse_args(["--dataset_name", "x"]).image_interpolation_mode == "bicubic"
    resized = {mode: np.asarray(center_crop_resize(image, (80, 48), f)) for mode, f in RESAMPLING.items()}
    assert len({r.tobytes() for r in resized.values()}) == 6  # nearest_exact is PIL's nearest
    assert all(r.shape == (48, 80, 3) for r in resized.values())


def run_loss(generator_seed=5, prediction_type="epsilon", **options):
    """compute_loss on fixed latents, with a model that records its input and predicts what the options' targets
    should be: the loss is zero exactly when the target is that."""
    from diffusers import DDPMScheduler

    args = SimpleNamespace(conditioning_dropout_prob=0.0, snr_gamma=None, noise_offset=0.0, input_perturbation=0.0)
    args.__dict__.update(options)
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    data = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(2, 4, 6, 10, generator=data), torch.randn(2, 32, generator=data)
    # the draws the options call for, in compute_loss's order
    replay = torch.Generator().manual_seed(generator_seed)
    noise = torch.randn(latents.shape, generator=replay)
    timesteps = torch.randint(0, 1000, (2,), generator=replay)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((2, 4, 1, 1), generator=replay)
    noisy_input = noise
    if args.input_perturbation:
        noisy_input = noise + args.input_perturbation * torch.randn(latents.shape, generator=replay)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    seen = {}

    def model(noisy, t, _, added_cond_kwargs):
        seen.update(noisy=noisy, timesteps=t)
        return SimpleNamespace(sample=torch.cat([target, torch.zeros_like(target)], dim=1))

    loss = decoder.compute_loss(model, {"latents": latents, "image_embeds": embeds},
                                torch.Generator().manual_seed(generator_seed), args=args, noise_scheduler=scheduler,
                                decoder=TextToImage(args), zero_embed=torch.zeros(1, 32))
    assert torch.equal(seen["timesteps"], timesteps)
    return loss.item(), torch.equal(seen["noisy"], scheduler.add_noise(latents, noisy_input, timesteps)), seen


@pytest.mark.parametrize("options", [
    {},  # the defaults draw what the decoder always drew
    {"noise_offset": 0.1},  # one shift per picture and channel, in the noise and so in the target
    {"input_perturbation": 0.1},  # more noise in the input, not in the target
    {"prediction_type": "v_prediction"},
    {"prediction_type": "v_prediction", "noise_offset": 0.05, "input_perturbation": 0.1},
])
def test_noise_options_and_prediction_type_change_the_input_and_target_as_the_sd_script_does(options):
    loss, input_as_expected, _ = run_loss(**options)
    assert loss == 0.0 and input_as_expected


def test_the_noise_options_do_change_what_the_model_sees():
    _, _, plain = run_loss()
    _, _, offset = run_loss(noise_offset=0.1)
    _, _, perturbed = run_loss(input_perturbation=0.1)
    assert not torch.equal(plain["noisy"], offset["noisy"]) and not torch.equal(plain["noisy"], perturbed["noisy"])
    shift = (offset["noisy"] - plain["noisy"]).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-6)  # constant over each latent channel


def test_clip_sees_in_training_what_it_sees_in_the_reference_scripts(tiny, tmp_path):
    """Both stages' `clip_pixel_values` (one sample at a time, through the training data path) equal what the
    reference scripts compute (`image.convert("RGB")`, then the processor on the whole batch), with the processor
    `CLIPImageProcessor` gives here: transformers' torchvision one (requirements.txt), not its PIL fallback."""
    from datasets import load_dataset
    from transformers import CLIPImageProcessor
    from transformers.image_processing_backends import TorchvisionBackend

    from kandinsky_train.data import TrainingSamples
    from kandinsky_train.stage import clip_pixels

    folder = tmp_path / "pictures"
    folder.mkdir()
    for number, (width, height) in enumerate([(67, 41), (300, 417), (224, 224), (31, 90)]):
        picture(width, height).save(folder / f"{number}.png")
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    processor = CLIPImageProcessor.from_pretrained(tiny["prior"], subfolder="image_processor")
    assert isinstance(processor, TorchvisionBackend)
    reference = processor([image.convert("RGB") for image in dataset["image"]], return_tensors="pt").pixel_values

    def decoder_view(image, row, variant, shape):
        return decoder.decoder_sample(image, 64, Image.BICUBIC, processor)

    def prior_view(image, row, variant, shape):  # the prior script's make_sample takes CLIP's view so
        return {"clip_pixel_values": clip_pixels(processor, image)}

    for make_sample in (decoder_view, prior_view):
        samples = TrainingSamples(dataset, "image", make_sample)
        seen = torch.stack([samples.sample(index, 0)["clip_pixel_values"] for index in range(len(samples))])
        assert seen.shape[0] == 4 and torch.equal(seen, reference)


def test_the_cache_key_of_the_image_embeddings_names_the_image_processor_class(tiny):
    """transformers' torchvision and PIL CLIP processors share their configuration, not their pixels: a cache of one
    is not the other's."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    from kandinsky_train.stage import clip_image_embedding

    keys = [clip_image_embedding(None, cls.from_pretrained(tiny["prior"], subfolder="image_processor"), "cpu",
                                 torch.float32).key for cls in (CLIPImageProcessor, CLIPImageProcessorPil)]
    assert keys[0]["image_processor"] == keys[1]["image_processor"] and keys[0] != keys[1]
