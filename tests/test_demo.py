"""The built-in demo as a newcomer runs it (`bash tools/demo.sh`): it must show that the training did something."""

import json
import re
import subprocess

import torch
from PIL import Image

from conftest import REPO, checkpoints, offline_env


def test_hand_set_movq_encodes_each_cell_as_its_mean_colour_and_paints_it_back(tiny):
    """The demo's premise: its MoVQ is an exact autoencoder of flat colours, so a fitted UNet shows as a picture.
    (The demo's tiny decoder is tools/tiny_kandinsky.py's, as the session's.)"""
    import demo_set
    from diffusers import VQModel

    movq = demo_set.set_flat_colour_autoencoder(VQModel.from_pretrained(tiny["decoder"], subfolder="movq"))
    picture = demo_set.draw("circle", "red", "blue", 64)
    pixels = demo_set.pixels_of(picture)
    with torch.no_grad():
        latents = movq.encode(pixels).latents
        painted = movq.decode(latents, force_not_quantize=True).sample
    cells = pixels.reshape(1, 3, 8, 8, 8, 8).mean(dim=(3, 5))  # (batch, rgb, row, column): each 8x8 cell's mean
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents[:, :3], cells, atol=2e-3, rtol=0)
    assert latents[:, 3].abs().max() == 0
    torch.testing.assert_close(painted, cells.repeat_interleave(8, 2).repeat_interleave(8, 3), atol=2e-3, rtol=0)
    assert demo_set.autoencoder_error(movq, Image.new("RGB", (64, 64), demo_set.COLOURS["purple"])) < 0.5


# Warning lines the demo's console may show, each with why it is fine (a pattern and a reason); any other line that
# warns fails the demo test: a newcomer would take it for a fault of this project.
ALLOWED_WARNINGS = [
    # (none today: torchvision serves transformers' CLIP image processor, and the demo's combined pipeline is called
    # with callback_steps=None, see tools/demo_report.py)
]


def warning_lines(console):
    """Every line of a console (stdout and stderr) that warns, as a terminal leaves it after carriage returns."""
    lines = (line.split("\r")[-1] for line in console.splitlines())
    return [line for line in lines if re.search(r"(?i)warn|deprecat", line)
            and not any(re.search(pattern, line) for pattern, _ in ALLOWED_WARNINGS)]


# The progress bars the demo's console may draw: ours (the steps, caching the frozen models' outputs, checking the
# images) and datasets' preparing of a data set, which takes long on a large one. The libraries' others (loading or
# writing each model's weights, a pipeline's components, every denoising step of a picture) say nothing.
OUR_BARS = {"Steps", "Caching frozen outputs", "Checking images", "Checking each conditioning image",
            "Generating train split"}


def progress_bars(console):
    """The description of every progress bar drawn on a console: tqdm's "DESC:  40%|████  | 2/5 [00:01<...]", or
    "DESC: 6 examples [00:00, ...]" without a total (numbered descriptions, "(1/2)", without their numbers)."""
    bars = set()
    for segment in re.split(r"[\r\n]", console):
        drawn = re.search(r"\d+%\||\d+ ?\w+ \[\d+:\d\d", segment)
        if drawn:
            bars.add(re.sub(r"(:| \(\d+/\d+\))*\s*$", "", segment[:drawn.start()]).strip())
    return bars


def test_demo_fits_its_pictures_and_reports_it(tmp_path):
    out = tmp_path / "demo-output"
    proc = subprocess.run(["bash", "tools/demo.sh", str(out)], cwd=REPO, env=offline_env(), capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert warning_lines(proc.stdout + "\n" + proc.stderr) == []
    assert "Steps" in progress_bars(proc.stderr) <= OUR_BARS

    # the console ends with where the report is, a line for each of the two other decoders, and one per stage
    report_line, _, _, prior_line, decoder_line, inpaint_line, controlnet_line = proc.stdout.strip().splitlines()[-7:]
    assert report_line.startswith(f"Report: {out}/report.png (numbers in {out}/report.json)")
    number = r"[0-9.e+-]+"
    assert re.fullmatch(rf"prior: 300 steps, {number} samples/s, loss {number} -> {number}", prior_line)
    assert re.fullmatch(rf"decoder: 800 steps, {number} samples/s, loss {number} -> {number}", decoder_line)
    assert re.fullmatch(rf"inpaint: 400 steps, {number} samples/s, loss {number} -> {number}", inpaint_line)
    assert re.fullmatch(rf"controlnet: 300 steps, {number} samples/s, loss {number} -> {number}", controlnet_line)

    report = json.loads((out / "report.json").read_text())
    assert len(report["pictures"]) == 6
    for i, picture in enumerate(report["pictures"]):
        # rendered from the picture's CLIP image embedding, the fine-tuned decoder draws that picture (within a
        # quarter of the untrained decoder's distance) and no other one
        assert picture["fine_tuned_distance"] < picture["untrained_distance"] / 4, picture
        assert picture["fine_tuned_nearest_picture"] == i, picture
        # and the fine-tuned prior + decoder, from the picture's caption alone, draw it about as well
        assert picture["from_caption_distance"] < picture["untrained_distance"] / 4, picture
    # the inpainting decoder repaints a box hiding most of each picture's shape: in it, the fine-tuned one is less than
    # half as far from the picture as the untrained one (a fifth to a third in the demo as committed)
    assert len(report["inpainting"]) == 6
    for picture in report["inpainting"]:
        assert picture["fine_tuned_masked_distance"] < picture["untrained_masked_distance"] / 2, picture
    # from each picture's embedding and depth hint, the fine-tuned ControlNet decoder paints that picture (less than
    # half the untrained one's distance; about a fifth) with its shape where the hint has it (overlap 0.6-0.8, from
    # 0.2-0.3)
    assert len(report["controlnet"]) == 6
    for picture in report["controlnet"]:
        assert picture["fine_tuned_distance"] < picture["untrained_distance"] / 2, picture
        assert picture["fine_tuned_hint_overlap"] > max(0.5, picture["untrained_hint_overlap"] + 0.2), picture
    for stage in report["stages"].values():
        assert stage["last_loss"] < stage["first_loss"] / 5, stage
    for name, stage in report["stages"].items():  # the console says what the report's numbers say
        assert (f"{name}: {stage['steps']} steps, {stage['samples_per_second']:.1f} samples/s, "
                f"loss {stage['first_loss']:.4g} -> {stage['last_loss']:.4g}") in proc.stdout.splitlines(), name

    with Image.open(out / "report.png") as image:
        assert image.width > 800 and image.height > 800
    assert (out / "sample.png").is_file()
    assert checkpoints(out / "prior") == ["checkpoint-200", "checkpoint-300"]
    assert checkpoints(out / "decoder") == ["checkpoint-600", "checkpoint-800"]
    assert checkpoints(out / "inpaint") == ["checkpoint-200", "checkpoint-400"]
    assert checkpoints(out / "controlnet") == ["checkpoint-150", "checkpoint-300"]
    assert sorted(p.name for p in (out / "decoder" / "validation").iterdir()) == [
        "step-000400-00.png", "step-000400-01.png", "step-000800-00.png", "step-000800-01.png"]
