"""Fast checks of the shared pieces that need no model: image conversion, checkpoint discovery, Min-SNR weights."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train_common as common


def test_16_bit_greyscale_keeps_its_tones():
    array = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    source = Image.fromarray(array)
    assert source.mode.startswith("I;16")
    image = common.to_rgb(source)
    rgb = np.asarray(image)
    assert image.mode == "RGB" and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 120 <= rgb[32, 0, 0] <= 135  # mid-grey stays mid-grey, not clipped to white


def test_transparent_pixels_become_white_and_cmyk_palette_convert():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(common.to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(common.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [0, 255, 0] + [0, 0, 0] * 252)
    assert np.asarray(common.to_rgb(palette))[0, 0].tolist() == [0, 255, 0]


def test_latest_ignores_foreign_and_incomplete_folders(tmp_path):
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           ("checkpoint-old", True), (".tmp-checkpoint-14", True), ("checkpoint-3-copy", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / common.STATE_FILE).write_text(json.dumps({"global_step": 1}))
    assert [s for s, _ in common.list_checkpoints(str(tmp_path))] == [2, 10]

    class Args:
        output_dir, resume_from_checkpoint = str(tmp_path), "latest"

    assert common.resolve_resume(Args).endswith("checkpoint-10")
    Args.resume_from_checkpoint = "checkpoint-12"
    with pytest.raises(common.UserError, match="does not exist or is incomplete.*checkpoint-2, checkpoint-10"):
        common.resolve_resume(Args)


def test_min_snr_weights_follow_the_prediction_type():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    t = torch.tensor([1, 100, 500, 999])
    for kind, expected in [("sample", lambda s: s.clamp(max=5)), ("epsilon", lambda s: s.clamp(max=5) / s),
                           ("v_prediction", lambda s: s.clamp(max=5) / (s + 1))]:
        scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind)
        snr = compute_snr(scheduler, t)
        assert torch.allclose(common.min_snr_weights(scheduler, t, 5.0), expected(snr))


def test_step_seeds_differ_by_rank_epoch_and_batch():
    seeds = {common.step_seed(0, r, e, b) for r in range(2) for e in range(2) for b in range(3)}
    assert len(seeds) == 12 and common.step_seed(0, 1, 1, 2) == common.step_seed(0, 1, 1, 2)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_unreadable_images_are_found_serially_and_in_parallel(num_proc, tmp_path):
    import datasets
    from test_robustness import write_bad_images

    folder = write_bad_images(tmp_path / "data", None)
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix != ".jsonl")
    report = common.ImageReport()
    kept = common.drop_unreadable(datasets.Dataset.from_dict({"image": paths}), "image", report, num_proc=num_proc)
    assert sorted(os.path.basename(n) for n in report.skipped) == ["garbage.jpg", "truncated.jpg", "zero.png"]
    assert sorted(os.path.basename(p) for p in kept["image"]) == [
        "cmyk.jpg", "good.png", "palette.png", "rgba.png", "sixteen.png"]
    embedded = [{"bytes": open(p, "rb").read(), "path": None} for p in paths]  # as Hub parquet data sets store them
    report = common.ImageReport()
    common.drop_unreadable(datasets.Dataset.from_dict({"image": embedded}), "image", report, num_proc=num_proc)
    assert report.skipped == [f"row {paths.index(str(tmp_path / 'data' / name))} <bytes>"
                              for name in ("garbage.jpg", "truncated.jpg", "zero.png")]
