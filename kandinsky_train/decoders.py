# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The three Kandinsky 2.2 decoders the decoder script trains: text-to-image, inpainting and depth ControlNet. They
share the MoVQ, the CLIP image condition and the noise objective; they differ in what the UNet takes beside the
noisy latents, in the data columns that feed it, and in the pipeline that renders and loads them. Which one a UNet
is comes from its configuration (`detect`); --decoder_type only makes a disagreement an error."""

import argparse
import os

import numpy as np

from . import inpainting
from .errors import fail
from .images import RESAMPLING, center_crop_resize, image_size, open_rgb

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
        if given:
            fail(f"{given[0]} is for the {'inpainting' if 'mask' in given[0] else 'inpainting or ControlNet'} "
                 f"decoder; --pretrained_decoder_model_name_or_path is {article(self.description)}.")

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
        `features` holds encode_inputs' outputs (where the batch was read: move them to noisy's device) and
        `sample_seed`, one seed per sample that is a function of (--seed, epoch, sample) alone (loop.py), for
        what is drawn anew each epoch."""
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

    @property
    def columns(self):
        return (self.args.mask_column,) if self.args.mask_column else ()

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
        if args.validation_prompts and (args.validation_image is None or args.validation_mask_image is None):
            fail("--validation_prompts on the inpainting decoder needs --validation_image and "
                 "--validation_mask_image: the picture each prompt repaints and its mask (white = repaint), one per "
                 "prompt or one for all.")
        self.validation_pictures = {flag: check_validation_pictures(args, flag, values) for flag, values in (
            ("--validation_image", args.validation_image), ("--validation_mask_image", args.validation_mask_image))}

    def check_data(self, dataset, held_out):
        if not self.args.mask_column:
            return dataset, held_out
        return check_paired_column(self.args, dataset, held_out, self.args.mask_column, "--mask_column", "mask")

    def sample_inputs(self, image, row, size, resample):
        if not self.args.mask_column:
            return {}
        mask = paired_picture(image, row, self.args.mask_column, size, resample, "mask")
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
        picture, mask = (validation_picture(self.validation_pictures[flag], number, size, resample)
                         for flag in ("--validation_image", "--validation_mask_image"))
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


# The picture-aligned columns of the inpainting and ControlNet decoders (a mask, a hint): shared checks and crops.

def check_paired_column(args, dataset, held_out, column, flag, what):
    """(dataset, held_out) with `column`, named by `flag`, checked and left undecoded: it must be a column of each
    set, and each of its pictures (`what`: "mask", "conditioning image") must have its picture's size, since it is
    cropped and resized with it. A streamed set is checked as it streams (`paired_picture`)."""
    from .data import undecoded

    checked = []
    separate = held_out is not None and held_out.split is None  # --validation_data_dir / _dataset_name
    for name, data, folder in (("the training data", dataset, paths_folder(args.dataset_name, args.train_data_dir)),
                               ("the held-out data", held_out and held_out.dataset,
                                paths_folder(args.validation_dataset_name, args.validation_data_dir) if separate
                                else paths_folder(args.dataset_name, args.train_data_dir))):
        if data is None:
            checked.append(None)
            continue
        columns = data.column_names or []
        if column not in columns:
            fail(f"{flag} {column!r} is not a column of {name}; its columns are: {', '.join(columns)}.")
        data = undecoded(data, column, folder)
        if not args.streaming:
            _check_sizes(data, args.image_column, column, what, name)
        checked.append(data)
    if held_out is not None:
        held_out.dataset = checked[1]
    return checked[0], held_out


def paths_folder(dataset_name, data_dir):
    """Where a paired column of file paths is resolved: a local data set's folder, or an image folder (whose
    metadata.jsonl names the mask or hint files beside the picture's `file_name`); None for a Hub data set."""
    from .data import data_folder

    folder = data_folder(argparse.Namespace(dataset_name=dataset_name))
    return folder or (os.path.abspath(data_dir) if data_dir else None)


def _check_sizes(dataset, image_column, column, what, name):
    pictures = dataset.map(_sizes_of, input_columns=[image_column, column], batched=True, batch_size=256,
                           remove_columns=dataset.column_names, desc=f"Checking each {what}'s size")
    bad = [i for i, same in enumerate(pictures["same"]) if not same]
    if bad:
        first = bad[0]
        fail(f"{len(bad)} {what}(s) of {name} are not the size of their picture (row {first}: picture "
             f"{pictures['picture'][first]}, {what} {pictures['paired'][first]}); the {what} is cropped and resized "
             "with the picture, so it must match it pixel for pixel.")


def _sizes_of(images, paired):
    picture = [image_size(value) for value in images]
    other = [image_size(value) for value in paired]
    return {"same": [a == b for a, b in zip(picture, other)], "picture": [f"{w}x{h}" for w, h in picture],
            "paired": [f"{w}x{h}" for w, h in other]}


def paired_picture(image, row, column, size, resample, what):
    """The `column` picture of a sample's row, centre-cropped and resized as the sample's picture `image` is, as an
    HxWx3 uint8 array; a picture of another size (a streamed set's, unchecked before) stops the run in one line."""
    paired = open_rgb(row[column])
    if paired.size != image.size:
        fail(f"A {what} of {paired.size[0]}x{paired.size[1]} pairs with a picture of {image.size[0]}x"
             f"{image.size[1]} (column {column!r}); it must match its picture pixel for pixel.")
    return np.asarray(center_crop_resize(paired, size, resample))


# The validation pictures of the inpainting and ControlNet decoders (--validation_image, --validation_mask_image).

def check_validation_pictures(args, flag, paths):
    """The pictures of `flag` (one per --validation_prompts entry, or one for all) opened as RGB, so that a count
    that does not fit or a file that does not read stops the run before any model loads; [] without the flag."""
    if paths is None:
        return []
    if not args.validation_prompts:
        fail(f"{flag} pairs with --validation_prompts, which is not given.")
    if len(paths) not in (1, len(args.validation_prompts)):
        fail(f"{flag}: {len(paths)} pictures for {len(args.validation_prompts)} --validation_prompts; give one per "
             "prompt, or one for all of them.")
    pictures = []
    for path in paths:
        try:
            pictures.append(open_rgb(path))
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            fail(f"{flag} {path!r} cannot be read as a picture: {type(error).__name__}: {error}")
    return pictures


def validation_picture(pictures, number, size, resample):
    """The picture for the `number`-th validation prompt, centre-cropped and resized to (width, height) `size` as
    the training pictures are."""
    return center_crop_resize(pictures[number if len(pictures) > 1 else 0], size, resample)
