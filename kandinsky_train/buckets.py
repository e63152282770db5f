# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""Aspect-ratio buckets (--enable_bucket, as in kohya's sd-scripts): training shapes of about --resolution² pixels
whose sides are multiples of what MoVQ and the UNet need, each image assigned to the shape nearest its aspect
ratio, and the order of one-shape micro-batches in each epoch, for each process."""

import math
import random
from collections import Counter

from .data import image_sizes
from .errors import fail


def movq_factor(movq_config):
    """Pixels per latent along a side: MoVQ halves the picture in every encoder level but the last."""
    return 2 ** (len(movq_config["block_out_channels"]) - 1)


def size_multiple(movq_config, unet_config):
    """What every side of a training shape must be a multiple of: MoVQ's factor times the UNet's, which halves its
    latents in every down block but the last (8 x 8 = 64 for Kandinsky 2.2). On other sides the UNet's resnet
    up-sampling blocks double an odd size past its skip connection's, and the forward pass fails."""
    return movq_factor(movq_config) * 2 ** (len(unet_config["down_block_types"]) - 1)


def check_resolution(resolution, multiple):
    """--resolution as the decoder's training (and held-out) side: a multiple of `size_multiple`, or the first step's
    forward pass fails after every model has loaded."""
    if resolution % multiple:
        lower = resolution // multiple * multiple
        nearest = " or ".join(str(side) for side in (lower, lower + multiple) if side > 0)
        fail(f"--resolution {resolution} does not fit the decoder: MoVQ and the UNet together divide each side by "
             f"{multiple}, so the side must be a multiple of {multiple}; the nearest are {nearest}.")


def render_multiple(movq_config):
    """KandinskyV22Pipeline rounds the height and width it renders up to multiples of MoVQ's factor squared."""
    return movq_factor(movq_config) ** 2


def parse_shapes(text, flag):
    """'768x1024,1024x768' -> [(768, 1024), (1024, 768)] (width x height)."""
    shapes = []
    for item in text.split(","):
        sides = item.strip().lower().split("x")
        if len(sides) != 2 or not all(side.isdigit() and int(side) > 0 for side in sides):
            fail(f"{flag} takes WIDTHxHEIGHT shapes separated by commas, such as 768x1024,1024x768; got {text!r}.")
        shapes.append((int(sides[0]), int(sides[1])))
    return shapes


def bucket_shapes(resolution, min_side, max_side, step):
    """(width, height) shapes of at most resolution² pixels: the square, and for each width from min_side to
    max_side in steps of `step` the tallest height that fits the area, in both orientations."""
    area = resolution * resolution
    shapes = {(resolution // step * step,) * 2}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            shapes |= {(width, height), (height, width)}
    return sorted(shapes)


class Buckets:
    """The shapes of a run and which of them each image trains at."""

    def __init__(self, resolution, min_side, max_side, step):
        self.resolution, self.min_side, self.max_side, self.step = resolution, min_side, max_side, step
        self.shapes = bucket_shapes(resolution, min_side, max_side, step)

    @classmethod
    def from_args(cls, args, multiple):
        """The buckets the flags ask for, checked against the model's size multiple (one line per problem). The
        defaults: steps of that multiple, sides from half to twice --resolution (kohya's 256 and 1024 at 512)."""
        step = args.bucket_reso_steps or multiple
        if step % multiple:
            fail(f"--bucket_reso_steps must be a multiple of {multiple}, got {step}: the decoder's MoVQ and UNet "
                 f"together divide each side by {multiple}.")
        min_side = args.min_bucket_reso or max(step, args.resolution // 2 // step * step)
        max_side = args.max_bucket_reso or args.resolution * 2 // step * step
        for flag, value in (("--min_bucket_reso", min_side), ("--max_bucket_reso", max_side)):
            if value % step:
                fail(f"{flag} must be a multiple of --bucket_reso_steps {step}, got {value}.")
        if not min_side <= args.resolution <= max_side:
            fail(f"--resolution {args.resolution} must lie between --min_bucket_reso {min_side} and "
                 f"--max_bucket_reso {max_side}.")
        return cls(args.resolution, min_side, max_side, step)

    def nearest(self, size):
        """The shape whose aspect ratio is nearest that of a (width, height) picture, compared as logarithms so
        that portrait and landscape are treated alike."""
        ratio = math.log(size[0] / size[1])
        return min(self.shapes, key=lambda shape: (abs(math.log(shape[0] / shape[1]) - ratio), shape))

    def assign(self, accelerator, dataset, image_column):
        """Each image's shape, from the sizes in the files' headers; the bucket counts are printed."""
        with accelerator.main_process_first():
            sizes = image_sizes(dataset, image_column)
        shapes = [self.nearest(size) for size in sizes]
        for line in self.describe(shapes):
            accelerator.print(line)
        return shapes

    def describe(self, shapes):
        """Lines for the log: the buckets in use, with their image counts."""
        counts = Counter(shapes)
        lines = [f"Aspect-ratio buckets: {len(counts)} of {len(self.shapes)} in use (about {self.resolution}² "
                 f"pixels, sides {self.min_side} to {self.max_side} in steps of {self.step}):"]
        for (width, height), count in sorted(counts.items()):
            lines.append(f"  bucket {width}x{height} (aspect {width / height:.2f}): {count} image(s)")
        return lines


def epoch_order(shapes, batch_size, seed, epoch, num_processes):
    """The micro-batches of one epoch, for each process: [process][micro-batch] -> sample indices.

    A pure function of its arguments, so that the processes agree without talking and a resumed run sees what an
    uninterrupted one sees: the samples of each shape are shuffled and cut into batches (the last of a bucket may
    be smaller: no image is dropped), the batches are shuffled, and the list is padded with its own first batches
    to a multiple of the number of processes, so that every process has as many micro-batches (DDP steps together).
    """
    rng = random.Random(f"buckets/{seed}/{epoch}")  # a string seed is hashed with SHA-512: the same everywhere
    by_shape = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(index)
    batches = []
    for shape in sorted(by_shape):
        indices = by_shape[shape]
        rng.shuffle(indices)
        batches += [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    batches += [batches[i % len(batches)] for i in range(-len(batches) % num_processes)]
    return [batches[rank::num_processes] for rank in range(num_processes)]
