# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The inpainting decoder's masks (`repaint`: True where the picture is repainted, white in a user's mask): read
from a mask picture as the pipeline reads one, drawn per sample and epoch when the data set has none, and grown by
one latent pixel as KandinskyV22InpaintPipeline grows them before they reach the UNet."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# diffusers' prepare_mask (pipeline_kandinsky2_2_inpainting.py) repaints, around each repainted latent pixel, its
# neighbours at (row, column) offsets (-1, 0), (0, -1), (-1, -1), (1, 0), (0, 1), (1, 1): not the (-1, 1) and
# (1, -1) corners. As a 3x3 window over the repainted pixels (the offsets negated: the same set, it is symmetric):
GROWTH_KERNEL = torch.tensor([[1.0, 1.0, 0.0],
                              [1.0, 1.0, 1.0],
                              [0.0, 1.0, 1.0]])


def repaint_pixels(mask_rgb):
    """A mask picture (HxWx3 uint8, already cropped and resized like its picture) as a 1xHxW uint8 tensor, 1 where
    it is repainted: its greyscale at 0.5 or more, as the pipeline thresholds it."""
    grey = np.asarray(Image.fromarray(mask_rgb).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey >= 0.5).astype(np.uint8))[None]


def to_latent_grid(repaint, latent_size):
    """Bx1xHxW repainted pixels onto the latents' (height, width) grid with nearest neighbour, as the pipeline
    resizes its mask; uint8, so a cached mask takes a byte per latent pixel."""
    return F.interpolate(repaint.float(), size=tuple(latent_size), mode="nearest").to(torch.uint8)


def grow(repaint):
    """The repainted area of Bx1xhxw latent masks grown as the pipeline's prepare_mask grows it, in one
    convolution instead of its loop over pixels; a bool tensor."""
    kernel = GROWTH_KERNEL.to(repaint.device)[None, None]
    return F.conv2d(repaint.float(), kernel, padding=1) > 0


def unet_input(noisy, latents, repaint):
    """Kandinsky's 9 input channels, in its order: the noisy latents, the picture's latents where kept, and `keep`
    (1 where kept: the pipeline inverts the user's mask), in the noisy latents' dtype and device."""
    keep = (~grow(repaint.to(noisy.device))).to(noisy.dtype)
    return torch.cat([noisy, latents.to(noisy) * keep, keep], dim=1)


# Masks drawn when the data set has none. Each comes from one sample's seed alone (diffusion.sample_seeds), at the
# latent grid: the same mask for a sample and epoch whatever the process, the batch or a resume.

def draw_masks(seeds, latent_size, full_prob, stroke_prob):
    """Bx1xhxw uint8 masks (1 = repaint), one per seed, at (height, width) `latent_size`."""
    height, width = latent_size
    drawn = [draw(int(seed), height, width, full_prob, stroke_prob)[1] for seed in seeds]
    return torch.from_numpy(np.stack(drawn).astype(np.uint8))[:, None]


def draw(seed, height, width, full_prob, stroke_prob):
    """(kind, an hxw bool mask) drawn from `seed`: "full" (the whole picture) with probability full_prob, "strokes"
    (LaMa-style thick random strokes) with probability stroke_prob, else "box" (a rectangle or an ellipse)."""
    rng = np.random.default_rng(seed)
    roll = rng.random()
    if roll < full_prob:
        return "full", np.ones((height, width), dtype=bool)
    canvas = Image.new("L", (width, height), 0)
    kind = "strokes" if roll < full_prob + stroke_prob else "box"
    (_strokes if kind == "strokes" else _box)(ImageDraw.Draw(canvas), rng, width, height)
    return kind, np.asarray(canvas) > 0


def _box(draw, rng, width, height):
    """A rectangle or an ellipse of 15% to 70% of each side, anywhere in the picture."""
    box_width = max(1, round(width * rng.uniform(0.15, 0.7)))
    box_height = max(1, round(height * rng.uniform(0.15, 0.7)))
    left, top = rng.integers(0, width - box_width + 1), rng.integers(0, height - box_height + 1)
    corners = [left, top, left + box_width - 1, top + box_height - 1]
    (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(corners, fill=255)


def _strokes(draw, rng, width, height):
    """One to four brush strokes, each a chain of one to five segments of random direction and length, a brush
    of 5% to 20% of the short side with round joints (LaMa's irregular masks, at the latent grid)."""
    side = min(width, height)
    for _ in range(rng.integers(1, 5)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        brush = max(1, round(side * rng.uniform(0.05, 0.2)))
        for _ in range(rng.integers(1, 6)):
            angle, length = rng.uniform(0, 2 * math.pi), side * rng.uniform(0.1, 0.4)
            end_x = float(np.clip(x + length * math.cos(angle), 0, width - 1))
            end_y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
            draw.line([(x, y), (end_x, end_y)], fill=255, width=brush)
            radius = brush / 2
            draw.ellipse([end_x - radius, end_y - radius, end_x + radius, end_y + radius], fill=255)
            x, y = end_x, end_y
