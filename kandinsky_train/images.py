# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Pictures as PIL sees them: opening a data set's image cell, converting any mode to RGB the way a person expects
it to look, its size from the header alone, the decoder's crop and resampling filters, and the grid of validation
images on the model card."""

import io
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The white of greyscale modes that are not 8-bit: 16-bit integers (Pillow reads 16-bit PNG and TIFF as "I;16*",
# older versions PNG as "I") and floats in [0, 1] ("F", as numpy and torchvision write them).
GREY_RANGE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}
# --image_interpolation_mode: torchvision's InterpolationMode names (diffusers' SD script) as the PIL filters that
# torchvision itself uses for PIL images (nearest_exact is PIL's nearest, which samples pixel centres).
RESAMPLING = {"nearest": Image.NEAREST, "nearest_exact": Image.NEAREST, "bilinear": Image.BILINEAR,
              "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


# Pictures that train as something else than they are (data.py warns of them): a side under MIN_SIDE pixels is
# upscaled many times; a side over MAX_ASPECT times the other is cut to a sliver by the crop or stretched by a bucket.
MIN_SIDE, MAX_ASPECT = 32, 4


def odd_shape(width, height):
    return min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height)


def image_name(value):
    """How to name an image cell in a message: its file, or "<bytes>" for images stored in the data set."""
    if isinstance(value, dict):
        return value.get("path") or "<bytes>"
    if isinstance(value, str):  # a column of file paths
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):  # a column of encoded files
        return "<bytes>"
    return getattr(value, "filename", None) or f"<{type(value).__name__}>"


def open_cell(value):
    """A dataset image cell (PIL image, {path, bytes} dict or path) as a PIL image, not decoded yet."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets' Image cell: the file's bytes, else its path
        value = value.get("bytes") or value["path"]
    if isinstance(value, (bytes, bytearray, memoryview)):  # also a binary column (not a datasets.Image) of files
        return Image.open(io.BytesIO(value))
    if isinstance(value, str) and "://" in value[:12]:  # Image.open would look for a local file of that name
        raise ValueError("a URL: pictures are not downloaded; download them and give their local paths")
    return Image.open(value)


def open_rgb(value):
    """Open a dataset image cell as an RGB image."""
    image = open_cell(value)
    image.load()
    return to_rgb(image)


def image_size(value):
    """(width, height) of a dataset image cell as `open_rgb` returns it, read from the header (no pixel decoding):
    EXIF orientations 5 to 8 turn the picture a quarter, which swaps its sides, unless the reader has turned it."""
    image = open_cell(value)
    width, height = image.size
    if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8) and not _turned_by_reader(image):
        return height, width
    return width, height


def _turned_by_reader(image):
    """Whether Pillow's reader already reports the picture in its EXIF orientation: its TIFF reader does (recent
    versions: the header's size is then not the stored one) and turns the pixels itself when it decodes them."""
    tags = getattr(image, "tag_v2", None)
    return tags is not None and (tags.get(256), tags.get(257)) != image.size  # ImageWidth, ImageLength


def to_rgb(image):
    """Convert any PIL mode to RGB the way a person would expect it to look."""
    image = ImageOps.exif_transpose(image)
    if image.mode in GREY_RANGE:
        # `convert("RGB")` would clip 16-bit greyscale above 255 to white and floats below 1 to black. The range
        # comes from the mode, never from the pixels: a dark 16-bit picture stays dark.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / GREY_RANGE[image.mode] * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels go on white, not on the black that a plain conversion gives.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def as_load_image_reads(image):
    """A picture as diffusers' load_image makes it, which the README's and model cards' code hand to the pipelines:
    EXIF orientation applied, then a plain convert("RGB") (alpha dropped, 16-bit clipped at 255)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def has_transparency(image):
    """Whether a PIL image has a pixel that is not fully opaque (an alpha channel below 255, a palette's or PNG's
    transparent colour in use)."""
    if not image.has_transparency_data:
        return False
    try:
        return image.convert("RGBA").getextrema()[3][0] < 255
    except ValueError:  # a mode Pillow cannot take to RGBA (16-bit with a transparent colour): treated as opaque
        return False


def center_crop_resize(image, size, resample=Image.BICUBIC, reducing_gap=1):
    """The decoder's transform: the largest centred crop with the aspect ratio of `size` (a side, for a square, or
    (width, height)), resized to it. Square and bicubic, it is the reference decoder script's transform, which
    reduces by whole factors before the filter (reducing_gap=1); every filter keeps that, unless `reducing_gap` says
    otherwise (None: the filter alone, as the inpainting pipeline resizes a mask)."""
    target_width, target_height = (size, size) if isinstance(size, int) else size
    width, height = image.size
    if width * target_height > height * target_width:  # wider than the target: crop the sides
        crop_width, crop_height = round(height * target_width / target_height), height
    else:
        crop_width, crop_height = width, round(width * target_height / target_width)
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    image = image.crop((left, top, left + crop_width, top + crop_height))
    return image.resize((target_width, target_height), resample=resample, reducing_gap=reducing_gap)


def image_grid(images):
    """Up to four images a row, each at the size of the first."""
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid
