# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Pictures as PIL sees them: opening a data set's image cell, converting any mode to RGB the way a person expects
it to look, the decoder's crop, and the grid of validation images on the model card."""

import io
import math

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_name(value):
    """How to name an image cell in a message: its file, or "<bytes>" for images stored in the data set."""
    if isinstance(value, dict):
        return value.get("path") or "<bytes>"
    if isinstance(value, str):  # a column of file paths
        return value
    return getattr(value, "filename", None) or f"<{type(value).__name__}>"


def open_rgb(value):
    """Open a dataset image cell (PIL image, {path, bytes} dict or path) as an RGB image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    else:
        image = Image.open(value)
    image.load()
    return to_rgb(image)


def to_rgb(image):
    """Convert any PIL mode to RGB the way a person would expect it to look."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: `convert("RGB")` would clip everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels go on white, not on the black that a plain conversion gives.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def center_crop_resize(image, resolution):
    """Deterministic centre crop to a square, then a bicubic resize (the decoder's transform)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)


def image_grid(images):
    """Up to four images a row, each at the size of the first."""
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid
