# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The three Kandinsky 2.2 decoders the decoder script trains: text-to-image, inpainting and depth ControlNet. They
share the MoVQ, the CLIP image condition and the noise objective; they differ in what the UNet takes beside the
noisy latents, in the data columns that feed it, and in the pipeline that renders and loads them. Which one a UNet
is comes from its configuration (`detect`); --decoder_type only makes a disagreement an error."""

import numpy as np
import torch

from .errors import fail, reason
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


class ControlNet(TextToImage):
    """The depth-ControlNet decoder (kandinsky-2-2-controlnet-depth): the UNet also takes a hint, a 3-channel
    picture in [0, 1] at the picture's pixel size, in added_cond_kwargs."""

    name = "controlnet"
    pipeline_class = "KandinskyV22ControlnetPipeline"
    auto_pipeline = None  # no AutoPipeline maps the ControlNet decoder
    what = "conditioning image"

    @property
    def columns(self):
        return (self.args.conditioning_image_column,)

    @property
    def cache_key(self):
        return {"conditioning_image_column": self.args.conditioning_image_column}

    def check_flags(self):
        """--validation_prompts each need a hint: --validation_image, one per prompt or one for all, readable."""
        super().check_flags()
        prompts, hints = self.args.validation_prompts, self.args.validation_image
        if prompts and not hints:
            fail("The ControlNet decoder renders --validation_prompts from a hint: give --validation_image, the "
                 "conditioning image (depth map) of each prompt, or one for all of them.")
        check_validation_pictures(prompts, hints, "--validation_image")

    def check_data(self, dataset, held_out):
        return check_paired_column(self.args, dataset, held_out, self.args.conditioning_image_column,
                                   "--conditioning_image_column", self.what)

    def sample_inputs(self, image, row, size, resample):
        # uint8, as compact in the samples and the cache as the picture's file; [0, 1] only on the device
        return {"hint": channels_first(paired_picture(image, row, self.args.conditioning_image_column, size,
                                                      resample, self.what))}

    def encode_inputs(self, batch, latents):
        return {"hint": batch["hint"]}

    def unet_inputs(self, noisy, features):
        return noisy, {"hint": hint_values(features["hint"].to(noisy.device), noisy.dtype)}

    def validation_inputs(self, number, size):
        hints = self.args.validation_image
        hint = open_rgb(hints[number if len(hints) > 1 else 0])
        resample = RESAMPLING[self.args.image_interpolation_mode]
        pixels = channels_first(np.asarray(center_crop_resize(hint, size, resample)))
        return {"hint": hint_values(pixels[None], torch.float32)}

    def snippet_inputs(self):
        side = self.args.resolution
        return (("import numpy as np", "from diffusers.utils import load_image", "",
                 f'depth = load_image("depth.png").resize(({side}, {side}))  # the hint: a depth map of the picture',
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


def check_validation_pictures(prompts, pictures, flag):
    """`flag`'s pictures pair with --validation_prompts: one per prompt or one for all, each a readable picture;
    one line otherwise, before any weight loads."""
    if not pictures:
        return
    if not prompts:
        fail(f"{flag} goes with --validation_prompts, which is not given.")
    if len(pictures) not in (1, len(prompts)):
        fail(f"{flag} has {len(pictures)} pictures for {len(prompts)} --validation_prompts: give one for each "
             "prompt, or one for all of them.")
    for path in pictures:
        try:
            open_rgb(path)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            fail(f"{flag} {path!r} cannot be read as a picture: {reason(error)}")


# The picture-aligned columns of the inpainting and ControlNet decoders (a mask, a hint): shared checks and crops.

def check_paired_column(args, dataset, held_out, column, flag, what):
    """(dataset, held_out) with `column`, named by `flag`, checked and left undecoded: it must be a column of each
    set, and each of its pictures (`what`: "mask", "conditioning image") must have its picture's size, since it is
    cropped and resized with it. A streamed set is checked as it streams (`paired_picture`)."""
    from .data import data_folder, undecoded

    checked = []
    for name, data in (("the training data", dataset), ("the held-out data", held_out and held_out.dataset)):
        if data is None:
            checked.append(None)
            continue
        columns = data.column_names or []
        if column not in columns:
            fail(f"{flag} {column!r} is not a column of {name}; its columns are: {', '.join(columns)}.")
        data = undecoded(data, column, data_folder(args))
        if not args.streaming:
            _check_sizes(data, args.image_column, column, what, name)
        checked.append(data)
    if held_out is not None:
        held_out.dataset = checked[1]
    return checked[0], held_out


def _check_sizes(dataset, image_column, column, what, name):
    pictures = dataset.map(_sizes_of, input_columns=[image_column, column], batched=True, batch_size=256,
                           remove_columns=dataset.column_names, desc=f"Checking each {what}'s size")
    unread = [i for i, why in enumerate(pictures["unreadable"]) if why]
    if unread:
        fail(f"{len(unread)} {what}(s) of {name} cannot be read (row {unread[0]}: "
             f"{pictures['unreadable'][unread[0]]}); fix or drop those rows.")
    bad = [i for i, same in enumerate(pictures["same"]) if not same]
    if bad:
        first = bad[0]
        fail(f"{len(bad)} {what}(s) of {name} are not the size of their picture (row {first}: picture "
             f"{pictures['picture'][first]}, {what} {pictures['paired'][first]}); the {what} is cropped and resized "
             "with the picture, so it must match it pixel for pixel.")


def _sizes_of(images, paired):
    picture = [image_size(value) for value in images]
    other, unreadable = [], []
    for value in paired:
        try:
            other.append(image_size(value))
            unreadable.append("")
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            other.append((0, 0))
            unreadable.append(reason(error))
    return {"same": [a == b for a, b in zip(picture, other)], "picture": [f"{w}x{h}" for w, h in picture],
            "paired": [f"{w}x{h}" for w, h in other], "unreadable": unreadable}


def paired_picture(image, row, column, size, resample, what):
    """The `column` picture of a sample's row, centre-cropped and resized as the sample's picture `image` is, as an
    HxWx3 uint8 array; a picture of another size (a streamed set's, unchecked before) stops the run in one line."""
    try:
        paired = open_rgb(row[column])
    except Exception as error:  # a streamed set's, unchecked before; or a file damaged past its header
        fail(f"A {what} of column {column!r} cannot be read: {reason(error)}")
    if paired.size != image.size:
        fail(f"A {what} of {paired.size[0]}x{paired.size[1]} pairs with a picture of {image.size[0]}x"
             f"{image.size[1]} (column {column!r}); it must match its picture pixel for pixel.")
    return np.asarray(center_crop_resize(paired, size, resample))
