# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The demo's one-page report: did the training do anything?

Reads the demo's runs back (TensorBoard logs, the saved pipelines) and writes, under the demo's folder:
  report.png   loss curves of both stages, their learning-rate schedules, and for each picture: the picture, what the
               untrained and the fine-tuned decoder render from its CLIP image embedding, and what the fine-tuned
               prior + decoder render from its caption
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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


def render_embeddings(decoder_dir, embeds, size):
    """The decoder alone, without guidance (the demo trains no unconditional case)."""
    from diffusers import KandinskyV22Pipeline

    pipe = KandinskyV22Pipeline.from_pretrained(decoder_dir)
    return [pipe(image_embeds=e[None], negative_image_embeds=torch.zeros_like(e[None]), guidance_scale=1.0,
                 height=size, width=size, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(i)).images[0] for i, e in enumerate(embeds)]


def render_captions(prior_dir, decoder_dir, captions, size):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    prior = DiffusionPipeline.from_pretrained(prior_dir)
    pipe = AutoPipelineForText2Image.from_pretrained(decoder_dir,
                                                     **{"prior_" + k: v for k, v in prior.components.items()})
    # callback_steps=None: the combined pipeline passes its own (default 1) on to the decoder pipeline, which
    # deprecates it with a FutureWarning on every call (diffusers 0.42); None passes nothing on.
    return [pipe(caption, height=size, width=size, num_inference_steps=STEPS, prior_num_inference_steps=STEPS,
                 guidance_scale=1.0, prior_guidance_scale=1.0, callback_steps=None,
                 generator=torch.Generator().manual_seed(i)).images[0] for i, caption in enumerate(captions)]


def stage_figures(run_dir):
    """A run's logged curves and its summary: steps, median samples/s, first and last training loss."""
    scalars = read_scalars(Path(run_dir) / "logs")
    loss = sorted((step, value) for step, (_, value) in scalars["train_loss"].items())
    lr = sorted((step, value) for step, (_, value) in scalars["lr"].items())
    speed = [value for step, (_, value) in scalars["samples_per_second"].items() if step > 1]  # step 1 warms up
    return {"steps": loss[-1][0], "samples_per_second": statistics.median(speed), "first_loss": loss[0][1],
            "last_loss": loss[-1][1], "loss": loss, "lr": lr}


def draw_report(path, stages, images, distances):
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    columns = len(images[0])
    figure = plt.figure(figsize=(2 * columns, 13), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 2.3])
    axes = top.subplots(1, 3)
    for axis, (name, stage) in zip(axes, stages.items()):
        steps, values = zip(*stage["loss"])
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axis.plot(steps, values, alpha=0.3, label="per step")
        axis.plot(steps[window - 1:], smooth, label=f"mean of {window} steps")
        axis.set(title=f"{name}: training loss", xlabel="optimizer step", yscale="log")
        axis.legend()
        axes[2].plot(*zip(*stage["lr"]), label=name)
    axes[2].set(title="learning rate (warm-up, cosine)", xlabel="optimizer step")
    axes[2].legend()
    grid = bottom.subplots(len(images), columns)
    for row, (label, renders) in enumerate(zip(ROWS, images)):
        for column, image in enumerate(renders):
            axis = grid[row][column]
            axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if row:
                axis.set_xlabel(f"distance {distances[row][column]:.0f}")
        grid[row][0].set_ylabel(label)
    bottom.suptitle("Each picture and what is rendered for it (distance: mean absolute pixel difference to the "
                    "picture, 0-255)")
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(out):
    out = Path(out)
    captions, pictures = load_pictures(out / "tiny" / "images")
    size = pictures[0].width
    embeds = image_embeddings(out / "tiny" / "prior", pictures)  # the image encoder is frozen: same in both
    base = render_embeddings(out / "tiny" / "decoder", embeds, size)
    tuned = render_embeddings(out / "decoder", embeds, size)
    from_caption = render_captions(out / "prior", out / "decoder", captions, size)
    from_caption[0].save(out / "sample.png")
    rows = [pictures, base, tuned, from_caption]
    distances = [[distance(image, target) for image, target in zip(row, pictures)] for row in rows]
    nearest = [int(np.argmin([distance(image, target) for target in pictures])) for image in tuned]
    stages = {name: stage_figures(out / name) for name in ("prior", "decoder")}
    draw_report(out / "report.png", stages, rows, distances)
    report = {"pictures": [{"caption": caption, "untrained_distance": distances[1][i],
                            "fine_tuned_distance": distances[2][i], "from_caption_distance": distances[3][i],
                            "fine_tuned_nearest_picture": nearest[i]} for i, caption in enumerate(captions)],
              "stages": {name: {k: v for k, v in stage.items() if k not in ("loss", "lr")}
                         for name, stage in stages.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"""
Also look at:
  {out}/prior/checkpoint-*, {out}/decoder/checkpoint-*   checkpoints (resume with --resume_from_checkpoint latest)
  {out}/prior/validation, {out}/decoder/validation      validation images
  {out}/sample.png                                      fine-tuned prior + decoder as one AutoPipelineForText2Image
  tensorboard --logdir {out}                            every logged figure
Report: {out}/report.png (numbers in {out}/report.json); mean distance to the pictures, untrained decoder \
{np.mean(distances[1]):.0f}, fine-tuned {np.mean(distances[2]):.0f}""")
    for name, stage in stages.items():
        print(f"{name}: {stage['steps']} steps, {stage['samples_per_second']:.1f} samples/s, "
              f"loss {stage['first_loss']:.4g} -> {stage['last_loss']:.4g}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw the demo's report from its runs.")
    parser.add_argument("out_dir", nargs="?", default="demo-output", help="The folder tools/demo.sh wrote.")
    main(parser.parse_args().out_dir)
