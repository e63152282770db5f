# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The three Kandinsky 2.2 decoders the decoder script trains: text-to-image, inpainting and depth ControlNet. They
share the MoVQ, the CLIP image condition and the noise objective; they differ in what the UNet takes beside the
noisy latents, in the data columns that feed it, and in the pipeline that renders and loads them. Which one a UNet
is comes from its configuration (`detect`); --decoder_type only makes a disagreement an error."""

import json
import os

import numpy as np
import torch

from . import inpainting
from .checkpoint_folders import Layout, is_reference, read_state, resume_path
from .errors import fail
from .images import RESAMPLING, image_name
from .paired_pictures import (MASK, check_paired_column, check_validation_pairs, check_validation_pictures,
                              paired_picture, validation_picture)

DECODER_TYPES = ("text2img", "inpaint", "controlnet")


def detect(unet_config):
    """The decoder a UNet configuration belongs to: 9 input channels (noisy latents, masked latents, mask) is the
    inpainting UNet; an `image_hint` addition embedding is the ControlNet UNet (its 8 input channels are the noisy
    latents and the hint's features, which the UNet concatenates itself)."""
    if unet_config.get("addition_embed_type") == "image_hint":
        return "controlnet"
    if unet_config.get("in_channels") == 9:
        return "inpaint"
    return "text2img"


def resolve(args, unet_config, source):
    """The decoder of --pretrained_decoder_model_name_or_path (`source`, for the error), checked against
    --decoder_type and against the flags that only one decoder takes."""
    found = detect(unet_config)
    if args.decoder_type not in ("auto", found):
        fail(f"--decoder_type {args.decoder_type}: the UNet of {source!r} is {article(DESCRIPTIONS[found])} "
             f"(in_channels {unet_config.get('in_channels')}, addition_embed_type "
             f"{unet_config.get('addition_embed_type')!r}). Give the matching decoder, or --decoder_type {found}.")
    decoder = {"text2img": TextToImage, "inpaint": Inpainting, "controlnet": ControlNet}[found](args)
    decoder.check_flags()
    return decoder


def check_resumed_type(args, decoder, source):
    """The checkpoint this run resumes was trained on the same decoder (before any weight loads: another decoder's
    UNet fails to load with a size mismatch, or, as a LoRA adapter, loads into the wrong model)."""
    path = resume_path(args, Layout.of(args, "decoder"))
    found = path and checkpoint_type(path)
    if found and found != decoder.name:
        fail(f"{os.path.basename(path)} is {article(DESCRIPTIONS[found])}'s checkpoint, and "
             f"--pretrained_decoder_model_name_or_path {source!r} is {article(decoder.description)}: resume it with "
             f"the {DESCRIPTIONS[found]} it was trained from, or train this one in another --output_dir.")


def checkpoint_type(path):
    """The decoder type a checkpoint recorded; for one that records none (older, or the reference scripts'), the
    type of the UNet configuration it holds; None when neither tells (an older LoRA checkpoint)."""
    if not is_reference(path):
        recorded = read_state(path).get("decoder_type")
        if recorded:
            return recorded
    for folder in ("unet", "unet_ema"):
        config = os.path.join(path, folder, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                return detect(json.load(f))
    return None


DESCRIPTIONS = {"text2img": "text-to-image decoder", "inpaint": "inpainting decoder",
                "controlnet": "depth-ControlNet decoder"}


def article(noun):
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


class TextToImage:
    """The text-to-image decoder: the UNet denoises MoVQ latents conditioned on the CLIP image embedding alone.
    The other decoders override what they add."""

    name = "text2img"
    pipeline_class = "KandinskyV22Pipeline"  # renders validation images and loads the final save
    auto_pipeline = "AutoPipelineForText2Image"
    tags = ()  # the model card's tags beside the text-to-image ones
    draws_per_sample = False  # whether unet_inputs reads features["sample_seed"] (Stage.draws_per_sample)

    def __init__(self, args):
        self.args = args

    @property
    def description(self):
        return DESCRIPTIONS[self.name]

    @property
    def columns(self):
        """The data set's columns read beside the picture."""
        return ()

    @property
    def cache_key(self):
        """What, beside the picture, the cached frozen outputs depend on (nothing for text-to-image, so that caches
        written before the other decoders existed stay valid)."""
        return {}

    def check_flags(self):
        """One-line errors for flags of another decoder (before any data or weight loads)."""
        given = [flag for flag, value in (("--mask_column", self.args.mask_column),
                                          ("--validation_mask_image", self.args.validation_mask_image))
                 if value is not None and self.name != "inpaint"]
        given += [flag for flag, value in (("--validation_image", self.args.validation_image),)
                  if value is not None and self.name == "text2img"]
        # given explicitly only: its default is ControlNet.column
        given += [flag for flag, value in (("--conditioning_image_column", self.args.conditioning_image_column),)
                  if value is not None and self.name != "controlnet"]
        if given:
            user = {"--validation_image": "inpainting or ControlNet", "--conditioning_image_column": "ControlNet"}
            fail(f"{given[0]} is for the {user.get(given[0], 'inpainting')} decoder; "
                 f"--pretrained_decoder_model_name_or_path is {article(self.description)}.")

    def check_column(self, flag, column, what):
        """A paired column that is not the picture column (`what`: what the column holds)."""
        if column == self.args.image_column:
            fail(f"{flag} {column!r} is the picture column (--image_column): each picture needs a {what} of its "
                 "own, in another column.")

    def sample_name(self, row):
        """A sample's row in a message: its picture's file (a streamed shard's key), if it has one."""
        name = row.get("__key__") or image_name(row.get(self.args.image_column))
        return "a picture stored in the data set" if name.startswith("<") else f"the picture {name!r}"

    def check_data(self, dataset, held_out):
        """(dataset, held_out) with the extra columns checked (present, readable, of the picture's size) before any
        weight loads, and left undecoded as data.undecoded leaves the pictures. held_out: a holdout.HeldOut or
        None; `dataset` is a datasets IterableDataset with --streaming (checked as it streams)."""
        return dataset, held_out

    def sample_inputs(self, image, row, size, resample):
        """The picture-aligned inputs of one sample beside its pixels (a mask, a hint), centre-cropped and resized
        like the picture to `size` ((width, height) or a side), as CHW tensors; the caller mirrors them with it."""
        return {}

    def encode_inputs(self, batch, latents):
        """The inputs `unet_inputs` reads, from a batch of samples and the batch's MoVQ latents (cacheable)."""
        return {}

    def unet_inputs(self, noisy, features):
        """(the UNet's `sample`, its added_cond_kwargs beside `image_embeds`) for noisy latents on the device;
        `features` holds encode_inputs' outputs (where the batch was read: move them to noisy's device) and, with
        `draws_per_sample`, `sample_seed`: one seed per sample that is a function of (--seed, epoch, sample) alone
        (loop.py), for what is drawn anew each epoch."""
        return noisy, {}

    def validation_inputs(self, number, size):
        """The pipeline's keyword arguments beside the embeddings for the `number`-th validation prompt at
        (width, height) `size`."""
        return {}

    def snippet_inputs(self):
        """The model card's code: (lines that prepare the pipeline's inputs, its call's arguments beside the
        embeddings), e.g. ((), ("hint=hint",))."""
        return (), ()


class Inpainting(TextToImage):
    """The inpainting decoder (kandinsky-2-2-decoder-inpaint): the UNet's input is Kandinsky's
    cat([noisy latents, latents * keep, keep]), `keep` 1 where the picture is kept."""

    name = "inpaint"
    pipeline_class = "KandinskyV22InpaintPipeline"
    auto_pipeline = "AutoPipelineForInpainting"
    tags = ("inpainting",)

    @property
    def columns(self):
        return (self.args.mask_column,) if self.args.mask_column else ()

    @property
    def draws_per_sample(self):  # without a mask column, the masks are drawn per sample and epoch
        return not self.args.mask_column

    @property
    def cache_key(self):  # drawn masks are not cached: the cache then holds what text-to-image caches
        return {"mask_column": self.args.mask_column} if self.args.mask_column else {}

    def check_flags(self):
        super().check_flags()
        args = self.args
        for flag, value in (("--random_mask_full_prob", args.random_mask_full_prob),
                            ("--random_mask_stroke_prob", args.random_mask_stroke_prob)):
            if not 0 <= value <= 1:
                fail(f"{flag} {value}: a share of the drawn masks, between 0 and 1.")
        if args.random_mask_full_prob + args.random_mask_stroke_prob > 1:
            fail(f"--random_mask_full_prob {args.random_mask_full_prob} and --random_mask_stroke_prob "
                 f"{args.random_mask_stroke_prob} add up to more than 1: they are shares of the same drawn masks.")
        if args.mask_column:
            self.check_column("--mask_column", args.mask_column, "mask")
        if args.validation_prompts and (args.validation_image is None or args.validation_mask_image is None):
            fail("--validation_prompts on the inpainting decoder needs --validation_image and "
                 "--validation_mask_image: the picture each prompt repaints and its mask (white = repaint), one per "
                 "prompt or one for all.")
        self.validation_pictures = {flag: check_validation_pictures(args, flag, values, what)
                                    for flag, values, what in (
                                        ("--validation_image", args.validation_image, None),
                                        ("--validation_mask_image", args.validation_mask_image, MASK))}
        check_validation_pairs(args, *self.validation_pictures.values())

    def check_data(self, dataset, held_out):
        if not self.args.mask_column:
            return dataset, held_out
        return check_paired_column(self.args, dataset, held_out, self.args.mask_column, "--mask_column", MASK)

    def sample_inputs(self, image, row, size, resample):
        if not self.args.mask_column:
            return {}
        mask = paired_picture(image, row, self.args.mask_column, size, resample, MASK, self.sample_name(row))
        return {"mask_pixels": inpainting.repaint_pixels(mask)}

    def encode_inputs(self, batch, latents):
        if not self.args.mask_column:
            return {}
        return {"repaint": inpainting.to_latent_grid(batch["mask_pixels"], latents.shape[-2:])}

    def unet_inputs(self, noisy, features):
        repaint = features["repaint"] if self.args.mask_column else inpainting.draw_masks(
            features["sample_seed"].tolist(), noisy.shape[-2:], self.args.random_mask_full_prob,
            self.args.random_mask_stroke_prob)
        return inpainting.unet_input(noisy, features["latents"], repaint), {}

    def validation_inputs(self, number, size):
        resample = RESAMPLING[self.args.image_interpolation_mode]
        picture, mask = (validation_picture(self.validation_pictures[flag], number, size, resample, what)
                         for flag, what in (("--validation_image", None), ("--validation_mask_image", MASK)))
        return {"image": picture, "mask_image": mask}

    def snippet_inputs(self):
        return (("", "from diffusers.utils import load_image",
                 'picture = load_image("picture.png")  # the picture to repaint',
                 'mask = load_image("mask.png")  # white: repainted, black: kept'),
                ("image=picture", "mask_image=mask"))


class ControlNet(TextToImage):
    """The depth-ControlNet decoder (kandinsky-2-2-controlnet-depth): the UNet also takes a hint, a 3-channel
    picture in [0, 1] at the picture's pixel size, in added_cond_kwargs."""

    name = "controlnet"
    pipeline_class = "KandinskyV22ControlnetPipeline"
    auto_pipeline = None  # no AutoPipeline maps the ControlNet decoder
    tags = ("controlnet",)
    what = "conditioning image"
    default_column = "conditioning_image"  # diffusers' ControlNet scripts' name

    @property
    def column(self):
        return self.args.conditioning_image_column or self.default_column

    @property
    def columns(self):
        return (self.column,)

    @property
    def cache_key(self):
        return {"conditioning_image_column": self.column}

    def check_flags(self):
        """--validation_prompts each need a hint: --validation_image, one per prompt or one for all, readable."""
        super().check_flags()
        prompts, hints = self.args.validation_prompts, self.args.validation_image
        if prompts and not hints:
            fail("The ControlNet decoder renders --validation_prompts from a hint: give --validation_image, the "
                 "conditioning image (depth map) of each prompt, or one for all of them.")
        self.check_column("--conditioning_image_column", self.column, "hint")
        self.hints = check_validation_pictures(self.args, "--validation_image", hints, self.what)

    def check_data(self, dataset, held_out):
        return check_paired_column(self.args, dataset, held_out, self.column, "--conditioning_image_column",
                                   self.what)

    def sample_inputs(self, image, row, size, resample):
        # uint8, as compact in the samples and the cache as the picture's file; [0, 1] only on the device
        return {"hint": channels_first(paired_picture(image, row, self.column, size, resample, self.what,
                                                      self.sample_name(row)))}

    def encode_inputs(self, batch, latents):
        return {"hint": batch["hint"]}

    def unet_inputs(self, noisy, features):
        return noisy, {"hint": hint_values(features["hint"].to(noisy.device), noisy.dtype)}

    def validation_inputs(self, number, size):
        hint = validation_picture(self.hints, number, size, RESAMPLING[self.args.image_interpolation_mode],
                                  self.what)
        return {"hint": hint_values(channels_first(np.asarray(hint))[None], torch.float32)}

    def snippet_inputs(self):
        side = self.args.resolution
        # load_image would clip a 16-bit depth map at 255 (almost all white): read it as training did
        return (("import numpy as np", "from PIL import Image", "from diffusers.utils import load_image", "",
                 "def eight_bit(depth):  # 16-bit depth maps scaled from 0-65535 (float ones from 0-1), as in training",
                 '    white = {"I": 65535, "I;16": 65535, "I;16B": 65535, "I;16L": 65535, "F": 1}.get(depth.mode)',
                 "    if white:",
                 "        depth = Image.fromarray(np.clip(np.asarray(depth, np.float64) / white * 255 + 0.5, 0, 255)"
                 ".astype(np.uint8))",
                 '    return depth.convert("RGB")', "",
                 f'depth = load_image("depth.png", eight_bit).resize(({side}, {side}))  # the hint: a depth map of the '
                 'picture',
                 "hint = torch.from_numpy(np.array(depth)).permute(2, 0, 1)[None].div(255)"
                 '.to("cuda", torch.float16)'),
                ("hint=hint", f"height={side}", f"width={side}"))


def channels_first(pixels):
    """An H x W x 3 uint8 array as a 3 x H x W tensor of its own."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def hint_values(pixels, dtype):
    """A uint8 hint (N x 3 x H x W) as the ControlNet UNet takes it: exactly pixels / 255 (what the pipeline's
    example passes), computed in float32 and then cast, as a user's `.float() / 255.0` then `.half()` is."""
    return (pixels.float() / 255.0).to(dtype)
