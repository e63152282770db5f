# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The demo's set: tiny random Kandinsky 2.2 repos and six flat coloured-shape pictures that a decoder visibly fits
in about a minute of CPU training.

A random MoVQ turns any latent into noise, so a random decoder repo could never show a fitted picture. Here the
MoVQ is not random: its weights are set by hand so that it is an exact autoencoder of flat
colours (the latent of each 8x8 cell is its mean colour; decoding paints the cell with it). The UNets and both CLIP
encoders stay random, and the UNets are what the demo trains; only the ControlNet UNet's hint block is set by hand
too (it passes each cell's depth on, see set_cell_mean_hint_block).

    python tools/demo_set.py OUT_DIR     # writes OUT_DIR/{prior,decoder,inpaint,controlnet,images,hints}
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_kandinsky import build_tiny_decoder, build_tiny_prior  # noqa: E402

# (shape, colour, background): six pictures that differ in colour, background and shape
PICTURES = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "green", "white"),
            ("circle", "white", "purple"), ("square", "blue", "orange"), ("triangle", "orange", "green")]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (120, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
# The hand-set MoVQ: in each group of four channels, (colour, -colour, K, -K) keep the group norm's statistics fixed
# whatever the picture (mean 0, variance about K**2 / 2), and OFFSET keeps SiLU in its nearly linear range.
K, OFFSET = 100.0, 10.0


def _shape(pen, shape, size, fill):
    box = [size // 5, size // 5, size * 4 // 5, size * 4 // 5]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)


def draw(shape, colour, background, size):
    image = Image.new("RGB", (size, size), COLOURS[background])
    _shape(ImageDraw.Draw(image), shape, size, COLOURS[colour])
    return image


def silhouette(shape, size):
    """Where the shape is: a bool (size x size) array."""
    image = Image.new("L", (size, size), 0)
    _shape(ImageDraw.Draw(image), shape, size, 255)
    return np.asarray(image) > 127


def depth_hint(shape, size):
    """The ControlNet decoder's hint, a depth map as MiDaS draws one (near is bright): the shape stands near, in front
    of a floor that recedes from the bottom edge to the top. It says where the shape is, never its colours."""
    floor = np.linspace(40, 110, size, dtype=np.float32)[:, None].repeat(size, 1)
    depth = np.where(silhouette(shape, size), 230, floor).astype(np.uint8)
    return Image.fromarray(depth).convert("RGB")


def build_pictures(path, size, hints=False):
    """The six pictures and their captions as an image folder; with hints, each picture's depth hint beside it
    (metadata's conditioning_image_file_name, the ControlNet decoder's column)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (shape, colour, background) in enumerate(PICTURES):
        name = f"{i:02d}_{colour}_{shape}.png"
        draw(shape, colour, background, size).save(path / name)
        rows.append({"file_name": name, "text": f"a {colour} {shape} on a {background} background"})
        if hints:
            rows[-1]["conditioning_image_file_name"] = f"{i:02d}_depth.png"
            depth_hint(shape, size).save(path / rows[-1]["conditioning_image_file_name"])
    (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _identity_taps(conv, pairs, taps, gain=1.0, bias=None):
    """conv.weight: zero, except out channel o reads in channel i at each (y, x) in taps with gain / len(taps)."""
    conv.weight.zero_()
    for out_channel, in_channel in pairs:
        for y, x in taps:
            conv.weight[out_channel, in_channel, y, x] = gain / len(taps)
    conv.bias.zero_() if bias is None else conv.bias.copy_(bias)


def set_flat_colour_autoencoder(movq):
    """Set a four-level, 32-channel VQModel (tiny_kandinsky's) to encode each 8x8 cell as its mean RGB in latent
    channels 0-2 and to decode by painting the cell with it. Residual branches are zeroed so every block passes
    its input through, and each downsampler averages 2x2 pixels."""
    enc, dec = movq.encoder, movq.decoder
    width = enc.conv_in.out_channels
    colour_pairs = [(4 * c, c) for c in range(3)]
    with torch.no_grad():
        for module in movq.modules():  # every residual branch adds nothing
            if module.__class__.__name__ in ("ResnetBlock2D", "ResnetBlockCondNorm2D"):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            if module.__class__.__name__ == "Attention":
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        # conv_in: (r, -r, K, -K, g, -g, K, -K, b, -b, K, -K, 0, ...)
        bias = torch.zeros(width)
        for c in range(3):
            bias[4 * c + 2], bias[4 * c + 3] = K, -K
        _identity_taps(enc.conv_in, colour_pairs, [(1, 1)], bias=bias)
        for c in range(3):
            enc.conv_in.weight[4 * c + 1, c, 1, 1] = -1.0
        for block in enc.down_blocks:
            for down in block.downsamplers or []:  # pads right and bottom, 3x3 stride 2: the top-left 2x2 is a cell
                _identity_taps(down.conv, [(i, i) for i in range(width)], [(0, 0), (0, 1), (1, 0), (1, 1)])
        enc.conv_norm_out.weight.fill_(K / math.sqrt(2))  # undoes the group norm's 1 / std
        enc.conv_norm_out.bias.fill_(OFFSET)
        _identity_taps(enc.conv_out, [(c, 4 * c) for c in range(3)], [(1, 1)],
                       bias=torch.tensor([-OFFSET] * 3 + [0.0] * (enc.conv_out.out_channels - 3)))
        _identity_taps(movq.quant_conv, [(i, i) for i in range(movq.quant_conv.in_channels)], [(0, 0)])
        # decoding: the last SpatialNorm ignores the decoder's features and paints the (nearest-upsampled) latent
        norm = dec.conv_norm_out
        norm.conv_y.weight.zero_()
        norm.conv_y.bias.zero_()
        _identity_taps(norm.conv_b, colour_pairs, [(0, 0)],
                       bias=torch.tensor([OFFSET if i in (0, 4, 8) else 0.0 for i in range(width)]))
        _identity_taps(dec.conv_out, [(c, 4 * c) for c in range(3)], [(1, 1)], bias=torch.full((3,), -OFFSET))
    return movq


def set_cell_mean_hint_block(unet):
    """Set a ControlNet UNet's hint block (diffusers' ImageHintTimeEmbedding: eight convolutions, three of them
    stride 2) to pass each 8x8 cell's mean grey of the hint on as latent channel 0, in [-1, 1] as MoVQ's colours.
    A random one passes nearly nothing on (each random layer shrinks how the hint varies), so a random ControlNet
    could not show it follows a hint in a minute of CPU; a real one's is trained to read depth maps."""
    convs = [module for module in unet.add_embedding.input_hint_block if isinstance(module, torch.nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            # padding 1: a stride-2 output at i reads 2i and 2i+1 with kernel rows (columns) 1 and 2
            taps = [(1, 1), (1, 2), (2, 1), (2, 2)] if conv.stride[0] == 2 else [(1, 1)]
            pairs = [(0, c) for c in range(conv.in_channels)] if i == 0 else [(0, 0)]
            if i == 0:  # grey, raised by OFFSET so that each SiLU after it is the identity
                _identity_taps(conv, pairs, taps, gain=1.0 / len(pairs), bias=torch.eye(conv.out_channels)[0] * OFFSET)
            elif i < len(convs) - 1:
                _identity_taps(conv, pairs, taps)
            else:  # 2 * grey - 1
                _identity_taps(conv, pairs, taps, gain=2.0, bias=torch.eye(conv.out_channels)[0] * (-2 * OFFSET - 1))
    return unet


def build_demo_set(root, size=128):
    """The prior, the three decoders (text-to-image, inpainting, depth ControlNet; random UNets, one hand-set MoVQ),
    the pictures, and the pictures with their depth hints."""
    from diffusers import UNet2DConditionModel, VQModel

    root = Path(root)
    built = {"prior": build_tiny_prior(root / "prior")}
    for name, decoder_type in (("decoder", "text2img"), ("inpaint", "inpaint"), ("controlnet", "controlnet")):
        built[name] = build_tiny_decoder(root / name, decoder_type=decoder_type)
        movq = set_flat_colour_autoencoder(VQModel.from_pretrained(built[name], subfolder="movq"))
        movq.save_pretrained(str(Path(built[name]) / "movq"))
        if decoder_type == "controlnet":
            unet = set_cell_mean_hint_block(UNet2DConditionModel.from_pretrained(built[name], subfolder="unet"))
            unet.save_pretrained(str(Path(built[name]) / "unet"))
    built["images"] = build_pictures(root / "images", size)
    built["hints"] = build_pictures(root / "hints", size // 2, hints=True)
    return built


def pixels_of(image):
    """A PIL picture as the (1, 3, H, W) tensor in [-1, 1] that MoVQ encodes."""
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def autoencoder_error(movq, image):
    """Largest per-pixel difference (0-255) between a flat picture and its MoVQ round trip."""
    pixels = pixels_of(image)
    with torch.no_grad():
        back = movq.decode(movq.encode(pixels).latents, force_not_quantize=True).sample
    return float((back - pixels).abs().max() * 127.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the demo's tiny Kandinsky 2.2 repos and six pictures.")
    parser.add_argument("out_dir", help="Folder to create prior/, decoder/, inpaint/, controlnet/, images/ and "
                        "hints/ in.")
    parser.add_argument("--resolution", type=int, default=128, help="Side of the square pictures, in pixels.")
    cli = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kandinsky_train.runtime import quiet_library_progress_bars

    quiet_library_progress_bars()
    for name, built in build_demo_set(cli.out_dir, cli.resolution).items():
        print(f"{name}: {built}")
