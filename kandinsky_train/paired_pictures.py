# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Pictures that pair with the training pictures, for the inpainting and ControlNet decoders: a data set's column
of masks or hints (each of its picture's size, cropped and resized with it), and the validation pictures
(--validation_image, --validation_mask_image) that pair with --validation_prompts.

A mask is read as the README's and model card's code hand it to KandinskyV22InpaintPipeline (diffusers' load_image:
its colours, alpha dropped) and resized as that pipeline resizes it (LANCZOS, no reducing gap); a hint as any
training picture (images.to_rgb: 16-bit depth scaled from 0-65535, as the card's code reads it too). Either one with
transparent pixels is refused: inference drops the alpha, so what it shows is not what would be read."""

import logging
import os

import numpy as np
from PIL import Image

from .errors import fail, reason
from .images import as_load_image_reads, center_crop_resize, has_transparency, image_name, image_size, open_cell, \
    open_rgb, to_rgb

logger = logging.getLogger(__name__)

MASK = "mask"
# Why a mask or hint with transparent pixels is refused, and what to do instead.
TRANSPARENT = {
    MASK: ("KandinskyV22InpaintPipeline reads a mask's colours alone (diffusers' load_image drops the alpha), so "
           "white strokes on transparency, or a mask held in the alpha channel, would not mean what they show",
           "Save masks opaque: white where repainted, black where kept."),
    "conditioning image": ("training would put them on white, and diffusers' load_image drops the alpha at "
                           "inference", "Save hints opaque.")}


class Transparent(ValueError):
    """A mask or hint with transparent pixels (TRANSPARENT says why it is refused)."""


def open_paired(value, what):
    """A mask (`what` MASK) or hint cell as an RGB PIL image, read as its inference reads it; Transparent if it has
    transparent pixels; PIL's own errors if it does not read."""
    image = open_cell(value)
    image.load()
    if has_transparency(image):
        raise Transparent("has transparent pixels: {}. {}".format(*TRANSPARENT[what]))
    return as_load_image_reads(image) if what == MASK else to_rgb(image)


def resize_paired(picture, size, resample, what):
    """A paired picture centre-cropped as its training picture and resized to `size`: a mask as the inpainting
    pipeline resizes one, a hint with the training pictures' filter (`resample`)."""
    if what == MASK:
        return center_crop_resize(picture, size, Image.LANCZOS, reducing_gap=None)
    return center_crop_resize(picture, size, resample)


def check_paired_column(args, dataset, held_out, column, flag, what):
    """(dataset, held_out) with `column`, named by `flag`, checked and left undecoded: it must be a column of each
    set, and each of its pictures (`what`: "mask", "conditioning image") must be there, read, be opaque and have its
    picture's size, since it is cropped and resized with it. A streamed set is checked as it streams
    (`paired_picture`). Masks that are all black (nothing to repaint) are warned of."""
    from .data import column_names, undecoded

    checked = []
    separate = held_out is not None and held_out.split is None  # --validation_data_dir / _dataset_name
    for name, data, folder in (("the training data", dataset, paths_folder(args.dataset_name, args.train_data_dir)),
                               ("the held-out data", held_out and held_out.dataset,
                                paths_folder(args.validation_dataset_name, args.validation_data_dir) if separate
                                else paths_folder(args.dataset_name, args.train_data_dir))):
        if data is None:
            checked.append(None)
            continue
        columns = column_names(data)
        if column not in columns:
            fail(f"{flag} {column!r} is not a column of {name}; its columns are: {', '.join(columns)}.")
        data = undecoded(data, column, folder)
        if not args.streaming:
            _check_pairs(data, args.image_column, column, what, name)
        checked.append(data)
    if what == MASK and not args.streaming:
        _warn_if_nothing_repainted(checked[0], column)
    if held_out is not None:
        held_out.dataset = checked[1]
    return checked[0], held_out


def paths_folder(dataset_name, data_dir):
    """Where a paired column of file paths is resolved: a local data set's folder, or an image folder (whose
    metadata.jsonl names the mask or hint files beside the picture's `file_name`); None for a Hub data set."""
    from .data import data_folder

    return data_folder(dataset_name) or (os.path.abspath(data_dir) if data_dir else None)


def _check_pairs(dataset, image_column, column, what, name):
    from .data import parallelism

    pairs = dataset.map(_pair_facts, input_columns=[image_column, column], batched=True, batch_size=256,
                        fn_kwargs={"what": what}, remove_columns=dataset.column_names,
                        num_proc=parallelism(dataset), desc=f"Checking each {what}")
    problems = pairs["problem"]
    missing = [i for i, problem in enumerate(problems) if problem == "missing"]
    if missing:
        fail(f"{len(missing)} row(s) of {name} have no {what} (rows {_listed(missing)}: column {column!r} is empty "
             f"there); give every picture its {what}, or drop those rows.")
    for kind, words, advice in (("unreadable", "cannot be read", "fix or drop those rows."),
                                ("transparent", "have transparent pixels", "{}. {}".format(*TRANSPARENT[what]))):
        bad = [i for i, problem in enumerate(problems) if problem == kind]
        if bad:
            why = pairs["why"][bad[0]]
            fail(f"{len(bad)} {what}(s) of {name} {words} (row {bad[0]}{': ' + why if why else ''}); {advice}")
    bad = [i for i, problem in enumerate(problems) if problem == "size"]
    if bad:
        first = bad[0]
        fail(f"{len(bad)} {what}(s) of {name} are not the size of their picture (row {first}: picture "
             f"{pairs['picture'][first]}, {what} {pairs['paired'][first]}); the {what} is cropped and resized "
             "with the picture, so it must match it pixel for pixel.")


def _listed(rows):
    return ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")


def _pair_facts(images, paired, what):
    """datasets.map function: each pair's sizes and the paired picture's problem ("missing", "unreadable",
    "transparent", "size" or ""), from the headers (a file that declares transparency is decoded to see it)."""
    facts = {"picture": [], "paired": [], "problem": [], "why": []}
    for value, other in zip(images, paired):
        width, height = image_size(value)
        problem, why, size = "", "", (0, 0)
        if other is None:
            problem = "missing"
        else:
            try:
                opened = open_cell(other)
                size = image_size(opened)
                if has_transparency(opened):
                    problem, why = "transparent", "" if image_name(other).startswith("<") else image_name(other)
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
                problem, why = "unreadable", reason(error)
        if not problem and size != (width, height):
            problem = "size"
        facts["picture"].append(f"{width}x{height}")
        facts["paired"].append(f"{size[0]}x{size[1]}")
        facts["problem"].append(problem)
        facts["why"].append(why)
    return facts


def _warn_if_nothing_repainted(dataset, column):
    """A warning when no mask repaints a pixel (all black, read as the pipeline reads them): the run would learn to
    copy its input. Stops at the first mask that repaints, so a usual data set decodes one mask here."""
    for start in range(0, len(dataset), 256):
        for value in dataset[start:start + 256][column]:
            try:
                if np.asarray(open_paired(value, MASK).convert("L")).max() >= 128:
                    return
            except Exception:  # damaged past its header: training names it when it reads it
                continue
    logger.warning(f"Every mask in column {column!r} is black (nothing to repaint, read as the pipeline reads a "
                   "mask: grey at 0.5 or more is repainted): the inpainting decoder will learn to copy the picture. "
                   "Check --mask_column and the masks (white = repaint).")


def paired_picture(image, row, column, size, resample, what, name):
    """The `column` picture of a sample's row (its picture `image`, `name`: "the picture 'x.png'"), centre-cropped
    and resized as the picture is, as an HxWx3 uint8 array; one that is missing, unreadable, transparent or of another
    size (a streamed set's, unchecked before) stops the run in one line that names the picture."""
    value = row[column]
    if value is None:
        fail(f"The {what} of {name} is missing (column {column!r} is empty in its row); give every picture its "
             f"{what}, or drop that row.")
    try:
        paired = open_paired(value, what)
    except Transparent as error:
        fail(f"The {what} of {name} {error}")
    except Exception as error:  # a streamed set's, unchecked before; or a file damaged past its header
        fail(f"The {what} of {name} (column {column!r}) cannot be read: {reason(error)}")
    if paired.size != image.size:
        fail(f"A {what} of {paired.size[0]}x{paired.size[1]} pairs with {name} of {image.size[0]}x{image.size[1]} "
             f"(column {column!r}); it must match its picture pixel for pixel.")
    return np.asarray(resize_paired(paired, size, resample, what))


def check_validation_pictures(args, flag, paths, what=None):
    """The pictures of `flag` (one per --validation_prompts entry, or one for all) opened as RGB (`what`: MASK or a
    hint's, read as `open_paired` reads them; None: a picture), so that a count that does not fit or a file that does
    not read stops the run before any model loads; [] without the flag."""
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
            pictures.append(open_paired(path, what) if what else open_rgb(path))
        except Transparent as error:
            fail(f"{flag} {path!r} {error}")
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            fail(f"{flag} {path!r} cannot be read as a picture: {reason(error)}")
    return pictures


def check_validation_pairs(args, pictures, masks):
    """Each validation picture and its mask of the same size, as a training pair must be (both are cropped and
    resized alike)."""
    for number in range(max(len(pictures), len(masks))):
        picture, mask = (items[number if len(items) > 1 else 0] for items in (pictures, masks))
        if picture.size != mask.size:
            paths = (args.validation_image, args.validation_mask_image)
            image_path, mask_path = (items[number if len(items) > 1 else 0] for items in paths)
            fail(f"--validation_mask_image {mask_path!r} is {mask.size[0]}x{mask.size[1]} and its --validation_image "
                 f"{image_path!r} {picture.size[0]}x{picture.size[1]}; a mask is cropped and resized with its "
                 "picture, so it must match it pixel for pixel.")


def validation_picture(pictures, number, size, resample, what=None):
    """The picture for the `number`-th validation prompt, centre-cropped and resized to (width, height) `size` as
    the training pictures are (a mask: as the pipeline resizes one)."""
    picture = pictures[number if len(pictures) > 1 else 0]
    return resize_paired(picture, size, resample, what) if what else center_crop_resize(picture, size, resample)
