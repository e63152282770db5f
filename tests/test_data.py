"""kandinsky_train.data in-process: columns and captions are checked before any model loads, unreadable images are
named and dropped (serially and in parallel), and samples carry their index."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fakes import FakeAccelerator
from kandinsky_train.data import ImageReport, TrainingSamples, caption_text, collate, drop_unreadable
from kandinsky_train.data import load_training_data
from kandinsky_train.errors import UserError


def data_args(**overrides):
    args = dict(dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None,
                image_column="image", max_train_samples=None, skip_image_check=False)
    args.update(overrides)
    return SimpleNamespace(**args)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_unreadable_images_are_found_serially_and_in_parallel(num_proc, tmp_path):
    import datasets

    from test_robustness import write_bad_images

    folder = write_bad_images(tmp_path / "data", None)
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix != ".jsonl")
    report = ImageReport()
    kept = drop_unreadable(datasets.Dataset.from_dict({"image": paths}), "image", report, num_proc=num_proc)
    assert sorted(os.path.basename(n) for n in report.skipped) == ["garbage.jpg", "truncated.jpg", "zero.png"]
    assert sorted(os.path.basename(p) for p in kept["image"]) == [
        "cmyk.jpg", "good.png", "palette.png", "rgba.png", "sixteen.png"]
    embedded = [{"bytes": open(p, "rb").read(), "path": None} for p in paths]  # as Hub parquet data sets store them
    report = ImageReport()
    drop_unreadable(datasets.Dataset.from_dict({"image": embedded}), "image", report, num_proc=num_proc)
    assert report.skipped == [f"row {paths.index(str(tmp_path / 'data' / name))} <bytes>"
                              for name in ("garbage.jpg", "truncated.jpg", "zero.png")]
    assert report.summary().startswith("3 unreadable image(s) skipped: row ")


def test_captions_lists_take_their_first_entry_and_reject_non_strings():
    assert caption_text("a cat") == "a cat"
    assert caption_text(["a cat", "a feline"]) == "a cat"
    assert caption_text(None) is None and caption_text(7) is None and caption_text([]) is None


def test_image_folder_loads_with_its_captions_and_columns_are_checked(tiny):
    dataset, report = load_training_data(data_args(train_data_dir=str(tiny["images"]), max_train_samples=5),
                                         FakeAccelerator(), caption_column="text")
    assert len(dataset) == 5 and dataset.column_names == ["image", "text"] and report.skipped == []
    with pytest.raises(UserError, match=r"--caption_column 'caption' is not a column of .*; its columns are: "
                                        r"image, text\."):
        load_training_data(data_args(train_data_dir=str(tiny["images"])), FakeAccelerator(), caption_column="caption")


def test_samples_carry_their_index_and_collate_stacks(tiny):
    dataset, _ = load_training_data(data_args(train_data_dir=str(tiny["images"]), skip_image_check=True),
                                    FakeAccelerator())
    samples = TrainingSamples(dataset, "image", lambda image, row, variant: {"size": torch.tensor(image.size)})
    batch = collate([samples[3], samples[0]])
    assert batch["index"].tolist() == [3, 0] and batch["size"].shape == (2, 2)
    rows = [json.loads(line) for line in (tiny["images"] / "metadata.jsonl").read_text().splitlines()]
    assert len(samples) == len(rows)
