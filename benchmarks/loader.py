# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The data loader's samples/s on the CPU, with transformers' torchvision CLIP image processor (what
requirements.txt installs) and its PIL one (what a machine without torchvision gets): the decoder's samples (its
768 px crop and CLIP's 224 px view) of random 1024x768 JPEGs, one process, no workers.

    python benchmarks/loader.py [--images 64] [--rounds 3]
"""

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def jpegs(count):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append({"bytes": buffer.getvalue(), "path": None})
    return out


def samples_per_second(processor, cells, rounds):
    import train_text_to_image_decoder as decoder
    from kandinsky_train.images import open_rgb

    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for cell in cells:
            decoder.decoder_sample(open_rgb(cell), 768, Image.BICUBIC, processor)
        best = max(best, len(cells) / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="How many random JPEGs to load.")
    parser.add_argument("--rounds", type=int, default=3, help="Passes over them; the best one counts.")
    args = parser.parse_args()
    import torch
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    torch.set_num_threads(1)
    cells = jpegs(args.images)
    for cls in (CLIPImageProcessorPil, CLIPImageProcessor):
        rate = samples_per_second(cls(), cells, args.rounds)
        print(f"{cls.__name__}: {rate:.1f} samples/s")


if __name__ == "__main__":
    main()
