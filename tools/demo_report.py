# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The demo's one-page report: did the training do anything?

Reads the demo's runs back (TensorBoard logs, the saved pipelines) and writes, under the demo's folder:
  report.png   loss curves of the four stages, their learning-rate schedules, and for each picture: what the
               untrained and the fine-tuned text-to-image decoder render from its CLIP image embedding and what the
               fine-tuned prior + decoder render from its caption; the inpainting decoder's repainting of a box hiding
               most of its shape, untrained and fine-tuned; the ControlNet decoder's rendering from its embedding and
               its depth hint, untrained and fine-tuned
  report.json  the same figures as numbers (the tests read them)
  sample.png   the fine-tuned prior + decoder, loaded as one AutoPipelineForText2Image, from the first caption

    python tools/demo_report.py demo-output
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_set import COLOURS, PICTURES, silhouette  # noqa: E402
from kandinsky_train.runtime import quiet_library_progress_bars  # noqa: E402
from kandinsky_train.tracking import read_scalars  # noqa: E402

STEPS = 25  # denoising steps of every render
ROWS = ["picture", "untrained decoder\n(from its CLIP\nimage embedding)", "fine-tuned decoder\n(same embedding)",
        "fine-tuned prior +\ndecoder (from\nthe caption)"]


def load_pictures(images_dir):
    rows = [json.loads(line) for line in (Path(images_dir) / "metadata.jsonl").read_text().splitlines()]
    return [row["text"] for row in rows], [Image.open(Path(images_dir) / row["file_name"]).convert("RGB")
                                           for row in rows]


def distance(image, target):
    """Mean absolute difference per pixel and channel, on the 0-255 scale."""
    return float(np.abs(np.asarray(image, np.float32) - np.asarray(target, np.float32)).mean())


@torch.no_grad()
def image_embeddings(prior_dir, pictures):
    from diffusers import KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(prior_dir)
    pixels = prior.image_processor(pictures, return_tensors="pt").pixel_values
    return prior.image_encoder(pixels).image_embeds


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)  # 25 denoising steps a picture: a bar each would flood the console
    return pipe


def _generators(count):
    return [torch.Generator().manual_seed(i) for i in range(count)]  # picture i's noise, however many are batched


def render_embeddings(decoder_dir, embeds, size):
    """The decoder alone, without guidance (the demo trains no unconditional case)."""
    from diffusers import KandinskyV22Pipeline

    pipe = _quiet(KandinskyV22Pipeline.from_pretrained(decoder_dir))
    return pipe(image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds), guidance_scale=1.0,
                height=size, width=size, num_inference_steps=STEPS, generator=_generators(len(embeds))).images


def render_captions(prior_dir, decoder_dir, captions, size):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    prior = DiffusionPipeline.from_pretrained(prior_dir)
    pipe = _quiet(AutoPipelineForText2Image.from_pretrained(
        decoder_dir, **{"prior_" + k: v for k, v in prior.components.items()}))
    # callback_steps=None: the combined pipeline passes its own (default 1) on to the decoder pipeline, which
    # deprecates it with a FutureWarning on every call (diffusers 0.42); None passes nothing on.
    return pipe(captions, height=size, width=size, num_inference_steps=STEPS, prior_num_inference_steps=STEPS,
                guidance_scale=1.0, prior_guidance_scale=1.0, callback_steps=None,
                generator=_generators(len(captions))).images


def mask_box(size):
    """The inpainting figure's mask: the middle of the picture, most of its shape (white = repaint)."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 4, size // 4, size * 3 // 4 - 1, size * 3 // 4 - 1], fill=255)
    return mask


def render_inpainting(decoder_dir, embeds, pictures, mask):
    """Each picture's box repainted from its CLIP image embedding. One picture a call: the pipeline (diffusers 0.42)
    keeps the first picture's unmasked area for every picture of a batch."""
    from diffusers import KandinskyV22InpaintPipeline

    pipe = _quiet(KandinskyV22InpaintPipeline.from_pretrained(decoder_dir))
    return [pipe(image_embeds=e[None], negative_image_embeds=torch.zeros_like(e[None]), image=picture,
                 mask_image=mask, guidance_scale=1.0, height=mask.height, width=mask.width,
                 num_inference_steps=STEPS, generator=generator).images[0]
            for e, picture, generator in zip(embeds, pictures, _generators(len(embeds)))]


def render_hints(decoder_dir, embeds, hints):
    """The ControlNet decoder from each picture's CLIP image embedding and a depth hint (pixels / 255, as the
    pipeline's documented example passes it)."""
    from diffusers import KandinskyV22ControlnetPipeline

    pipe = _quiet(KandinskyV22ControlnetPipeline.from_pretrained(decoder_dir))
    hint = torch.from_numpy(np.stack([np.asarray(h) for h in hints])).permute(0, 3, 1, 2).float() / 255
    return pipe(image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds), hint=hint, guidance_scale=1.0,
                height=hint.shape[2], width=hint.shape[3], num_inference_steps=STEPS,
                generator=_generators(len(embeds))).images


def masked_distance(image, target, mask):
    """distance() inside the mask's white area."""
    inside = np.asarray(mask) > 127
    return float(np.abs(np.asarray(image, np.float32) - np.asarray(target, np.float32))[inside].mean())


def shape_overlap(image, colours, where):
    """How well a render's shape covers `where` (a bool array): the pixels nearer the shape's colour than the
    background's, as intersection over union with it."""
    pixels = np.asarray(image, np.float32)
    shape_colour, background = (np.array(COLOURS[c], np.float32) for c in colours)
    painted = np.linalg.norm(pixels - shape_colour, axis=2) < np.linalg.norm(pixels - background, axis=2)
    return float((painted & where).sum() / max(1, (painted | where).sum()))


def stage_figures(run_dir):
    """A run's logged curves and its summary: steps, median samples/s, first and last training loss."""
    scalars = read_scalars(Path(run_dir) / "logs")
    loss = sorted((step, value) for step, (_, value) in scalars["train_loss"].items())
    lr = sorted((step, value) for step, (_, value) in scalars["lr"].items())
    speed = [value for step, (_, value) in scalars["samples_per_second"].items() if step > 1]  # step 1 warms up
    return {"steps": loss[-1][0], "samples_per_second": statistics.median(speed), "first_loss": loss[0][1],
            "last_loss": loss[-1][1], "loss": loss, "lr": lr}


STAGES = {"prior": "prior", "decoder": "text-to-image decoder", "inpaint": "inpainting decoder",
          "controlnet": "depth-ControlNet decoder"}


def draw_report(path, stages, blocks):
    """Loss curves and learning rates on top, then per decoder a block: (title, [(row label, pictures,
    [caption under each] or None)])."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    columns = len(blocks[0][1][0][1])
    heights = [2] + [len(rows) for _, rows in blocks]
    figure = plt.figure(figsize=(2 * columns, 2.3 * sum(heights)), layout="constrained")
    top, *bottoms = figure.subfigures(len(heights), 1, height_ratios=heights)
    axes = top.subplots(2, 3).flatten()
    for axis, (name, stage) in zip(axes[[0, 1, 3, 4]], stages.items()):
        steps, values = zip(*stage["loss"])
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axis.plot(steps, values, alpha=0.3, label="per step")
        axis.plot(steps[window - 1:], smooth, label=f"mean of {window} steps")
        axis.set(title=f"{STAGES[name]}: training loss", xlabel="optimizer step", yscale="log")
        axis.legend()
        axes[2].plot(*zip(*stage["lr"]), label=STAGES[name])
    axes[2].set(title="learning rate (warm-up, cosine)", xlabel="optimizer step")
    axes[2].legend()
    axes[5].set_axis_off()
    for bottom, (title, rows) in zip(bottoms, blocks):
        grid = bottom.subplots(len(rows), columns)
        for row, (label, images, captions) in enumerate(rows):
            for column, image in enumerate(images):
                axis = grid[row][column]
                axis.imshow(image)
                axis.set_xticks([])
                axis.set_yticks([])
                if captions:
                    axis.set_xlabel(captions[column])
            grid[row][0].set_ylabel(label)
        bottom.suptitle(title)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def load_hints(hints_dir):
    rows = [json.loads(line) for line in (Path(hints_dir) / "metadata.jsonl").read_text().splitlines()]
    return [Image.open(Path(hints_dir) / row["conditioning_image_file_name"]).convert("RGB") for row in rows]


def text_to_image_block(out, embeds, captions, pictures):
    tiny, size = out / "tiny", pictures[0].width
    base = render_embeddings(tiny / "decoder", embeds, size)
    tuned = render_embeddings(out / "decoder", embeds, size)
    from_caption = render_captions(out / "prior", out / "decoder", captions, size)
    from_caption[0].save(out / "sample.png")
    distances = [[distance(image, target) for image, target in zip(row, pictures)]
                 for row in (base, tuned, from_caption)]
    nearest = [int(np.argmin([distance(image, target) for target in pictures])) for image in tuned]
    figures = [{"caption": caption, "untrained_distance": distances[0][i], "fine_tuned_distance": distances[1][i],
                "from_caption_distance": distances[2][i], "fine_tuned_nearest_picture": nearest[i]}
               for i, caption in enumerate(captions)]
    labels = [[f"distance {d:.0f}" for d in row] for row in distances]
    rows = [(ROWS[0], pictures, None)] + list(zip(ROWS[1:], (base, tuned, from_caption), labels))
    return figures, ("Text-to-image decoder: each picture and what is rendered for it\n(distance: mean absolute pixel "
                     "difference to the picture, 0-255)", rows)


def inpainting_block(out, embeds, pictures):
    mask = mask_box(pictures[0].width)
    shown = [Image.composite(Image.new("RGB", mask.size, (128, 128, 128)), picture, mask) for picture in pictures]
    renders = [render_inpainting(folder, embeds, pictures, mask) for folder in (out / "tiny" / "inpaint",
                                                                                out / "inpaint")]
    distances = [[masked_distance(image, target, mask) for image, target in zip(row, pictures)] for row in renders]
    figures = [{"untrained_masked_distance": before, "fine_tuned_masked_distance": after}
               for before, after in zip(*distances)]
    labels = [[f"in the box {d:.0f}" for d in row] for row in distances]
    rows = [("the picture, its\nbox masked\n(repainted)", shown, None),
            *zip(["untrained\ninpainting decoder", "fine-tuned\n(same box and\nembedding)"], renders, labels)]
    return figures, ("Inpainting decoder: the grey box of each picture repainted from its CLIP image embedding\n"
                     "(in the box: mean absolute pixel difference there to the picture, 0-255)", rows)


def controlnet_block(out, embeds, pictures):
    size = pictures[0].width
    hints = load_hints(out / "tiny" / "hints")
    wheres = [silhouette(shape, size) for shape, _, _ in PICTURES]
    colours = [(colour, background) for _, colour, background in PICTURES]
    renders = [render_hints(folder, embeds, hints) for folder in (out / "tiny" / "controlnet", out / "controlnet")]
    distances = [[distance(image, target) for image, target in zip(row, pictures)] for row in renders]
    overlaps = [[shape_overlap(image, pair, where) for image, pair, where in zip(row, colours, wheres)]
                for row in renders]
    figures = [{"untrained_distance": d0, "fine_tuned_distance": d1, "untrained_hint_overlap": o0,
                "fine_tuned_hint_overlap": o1} for d0, d1, o0, o1 in zip(*distances, *overlaps)]
    labels = [[f"distance {d:.0f}\noverlap {o:.2f}" for d, o in zip(*row)] for row in zip(distances, overlaps)]
    rows = [("depth hint", hints, None),
            *zip(["untrained\nControlNet decoder\n(embedding + hint)", "fine-tuned\n(same embedding\nand hint)"],
                 renders, labels)]
    return figures, ("Depth-ControlNet decoder: from each picture's CLIP image embedding and its depth hint\n"
                     "(distance: to the picture, as above; overlap: of the painted shape with the hint's, 0-1)", rows)


def main(out):
    out = Path(out)
    quiet_library_progress_bars()
    captions, pictures = load_pictures(out / "tiny" / "images")
    embeds = image_embeddings(out / "tiny" / "prior", pictures)  # the image encoder is frozen: same in all
    text_to_image, text_to_image_rows = text_to_image_block(out, embeds, captions, pictures)
    inpainting, inpainting_rows = inpainting_block(out, embeds, pictures)
    # the ControlNet decoder trains at half the size: its hint block is costly on a CPU
    _, small = load_pictures(out / "tiny" / "hints")
    controlnet, controlnet_rows = controlnet_block(out, image_embeddings(out / "tiny" / "prior", small), small)
    stages = {name: stage_figures(out / name) for name in STAGES}
    draw_report(out / "report.png", stages, [text_to_image_rows, inpainting_rows, controlnet_rows])
    report = {"pictures": text_to_image, "inpainting": inpainting, "controlnet": controlnet,
              "stages": {name: {k: v for k, v in stage.items() if k not in ("loss", "lr")}
                         for name, stage in stages.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    mean = lambda rows, key: np.mean([row[key] for row in rows])  # noqa: E731
    print(f"""
Also look at:
  {out}/*/checkpoint-*                   checkpoints of each stage (resume with --resume_from_checkpoint latest)
  {out}/*/validation                     validation images
  {out}/sample.png                       fine-tuned prior + decoder as one AutoPipelineForText2Image
  tensorboard --logdir {out}             every logged figure
Report: {out}/report.png (numbers in {out}/report.json); mean distance to the pictures, untrained decoder \
{mean(text_to_image, "untrained_distance"):.0f}, fine-tuned {mean(text_to_image, "fine_tuned_distance"):.0f}
Inpainting decoder: mean distance in the repainted box, untrained {mean(inpainting, "untrained_masked_distance"):.0f}, \
fine-tuned {mean(inpainting, "fine_tuned_masked_distance"):.0f}
ControlNet decoder: mean distance to the pictures, untrained {mean(controlnet, "untrained_distance"):.0f}, \
fine-tuned {mean(controlnet, "fine_tuned_distance"):.0f}; overlap of the painted shape with the hint's, untrained \
{mean(controlnet, "untrained_hint_overlap"):.2f}, fine-tuned {mean(controlnet, "fine_tuned_hint_overlap"):.2f}""")
    for name, stage in stages.items():
        print(f"{name}: {stage['steps']} steps, {stage['samples_per_second']:.1f} samples/s, "
              f"loss {stage['first_loss']:.4g} -> {stage['last_loss']:.4g}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the demo's report from its runs.")
    parser.add_argument("out_dir", nargs="?", default="demo-output", help="The folder tools/demo.sh wrote.")
    main(parser.parse_args().out_dir)
