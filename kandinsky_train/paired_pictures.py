# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Pictures that pair with the training pictures, for the inpainting and ControlNet decoders: a data set's column
of masks or hints (each of its picture's size, cropped and resized with it), and the validation pictures
(--validation_image, --validation_mask_image) that pair with --validation_prompts."""

import os

import numpy as np

from .errors import fail, reason
from .images import center_crop_resize, image_size, open_rgb


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

    return data_folder(dataset_name) or (os.path.abspath(data_dir) if data_dir else None)


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
            fail(f"{flag} {path!r} cannot be read as a picture: {reason(error)}")
    return pictures


def validation_picture(pictures, number, size, resample):
    """The picture for the `number`-th validation prompt, centre-cropped and resized to (width, height) `size` as
    the training pictures are."""
    return center_crop_resize(pictures[number if len(pictures) > 1 else 0], size, resample)
