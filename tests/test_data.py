"""kandinsky_train.data in-process: columns and captions are checked before any model loads, unreadable images are
named and dropped (serially and in parallel), and samples carry their index."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fakes import FakeAccelerator
from kandinsky_train.data import ImageReport, TrainingSamples, Variants, caption_counts, caption_text, captions
from kandinsky_train.data import collate, drop_unreadable, load_training_data
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


def test_caption_cells_are_strings_or_lists_of_strings():
    assert captions("a cat") == ["a cat"] and captions(["a cat", "a feline"]) == ["a cat", "a feline"]
    assert caption_text(["a cat", "a feline"]) == "a cat" and caption_text(["a cat", "a feline"], 1) == "a feline"
    for bad in (None, 7, [], ["a cat", 7], [None]):
        assert captions(bad) is None and caption_text(bad) is None


def caption_lists(tiny, folder, lists):
    """The tiny image folder with a list of captions per picture."""
    import shutil

    shutil.copytree(tiny["images"], folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({**row, "text": texts}) + "\n"
                                                   for row, texts in zip(rows, lists)))
    return folder


def test_several_captions_per_picture_one_drawn_per_sample_and_epoch_from_the_seed(tiny, tmp_path):
    """A list in the caption column (as many Hub data sets have): every caption is checked, and each epoch trains on
    one of them per sample, drawn from the run's seed, so a resumed run draws what an uninterrupted one draws; data
    loader workers, persistent ones too, follow the epoch."""
    lists = [[f"picture {i} caption {k}" for k in range(1 + i % 3)] for i in range(8)]
    folder = caption_lists(tiny, tmp_path / "lists", lists)
    dataset, _ = load_training_data(data_args(train_data_dir=str(folder)), FakeAccelerator(), caption_column="text")
    counts = caption_counts(dataset, "text")
    assert counts == [1, 2, 3, 1, 2, 3, 1, 2]

    def make_sample(image, row, variant, shape):  # what the prior does with a row
        return {"caption": torch.tensor(int(caption_text(row["text"], variant).split()[-1]))}

    def drawn(samples, epochs, **loader):
        chosen = []
        batches = torch.utils.data.DataLoader(samples, batch_size=8, collate_fn=collate, **loader)
        for epoch in epochs:
            samples.set_epoch(epoch)
            chosen.append(next(iter(batches))["caption"].tolist())
        return chosen

    samples = TrainingSamples(dataset, "image", make_sample, ("text",), Variants(counts, seed=0))
    first = drawn(samples, range(6))
    assert all(caption < count for epoch in first for caption, count in zip(epoch, counts))
    assert len({tuple(epoch) for epoch in first}) > 1  # a new draw each epoch...
    assert {c for epoch in first for c in epoch[2::3]} == {0, 1, 2}  # ...over every caption
    again = TrainingSamples(dataset, "image", make_sample, ("text",), Variants(counts, seed=0))
    assert drawn(again, [3, 4, 5]) == first[3:]  # a resumed run starting at epoch 3
    assert drawn(again, range(6), num_workers=1, persistent_workers=True) == first
    assert drawn(TrainingSamples(dataset, "image", make_sample, ("text",), Variants(counts, seed=1)), range(6)) != first
    with pytest.raises(UserError, match=r"1 sample\(s\) have a missing or non-string caption in column 'text' "
                                        r"\(rows 2\)"):
        bad = caption_lists(tiny, tmp_path / "bad", [["a"], ["b"], ["c", None]] + [["x"]] * 5)
        load_training_data(data_args(train_data_dir=str(bad)), FakeAccelerator(), caption_column="text")


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
    samples = TrainingSamples(dataset, "image", lambda image, row, variant, shape: {"size": torch.tensor(image.size)})
    batch = collate([samples[3], samples[0]])
    assert batch["index"].tolist() == [3, 0] and batch["size"].shape == (2, 2)
    rows = [json.loads(line) for line in (tiny["images"] / "metadata.jsonl").read_text().splitlines()]
    assert len(samples) == len(rows)


def test_tiny_and_extreme_pictures_are_named_once_with_a_count(tmp_path):
    """A 1x4000 sliver and a 1x1 dot are cut, stretched or upscaled into the training shapes: one warning counts them
    and names one; an ordinary 4:3 photo and a 64 px thumbnail raise none."""
    import datasets
    from PIL import Image

    from conftest import warnings_seen

    sizes = {"photo.png": (80, 60), "thumb.png": (64, 64), "sliver.png": (1, 4000), "dot.png": (1, 1)}
    for name, size in sizes.items():
        Image.new("RGB", size, (90, 120, 200)).save(tmp_path / name)
    paths = [str(tmp_path / name) for name in sizes]
    with warnings_seen() as seen:
        drop_unreadable(datasets.Dataset.from_dict({"image": paths[:2]}), "image", ImageReport())
    assert not [text for text in seen if "picture(s)" in text]
    with warnings_seen() as seen:
        drop_unreadable(datasets.Dataset.from_dict({"image": paths}), "image", ImageReport())
    odd = [text for text in seen if "picture(s)" in text]
    assert odd == [f"2 picture(s) are tiny or of an extreme shape (a side under 32 px, or one over 4 times the other), "
                   f"for example {tmp_path / 'sliver.png'} (1x4000): training upscales, crops or stretches them into "
                   "its shapes. Check the data, or drop them."]


@pytest.mark.parametrize("processes, cap", [(1, 3), (2, 2)])
def test_a_batch_larger_than_the_data_set_is_capped_to_it(processes, cap):
    """--train_batch_size 1000 on 3 pictures trains in batches of the whole data set (of each process's share, the
    same on every process), so the frozen encoders, which pad a short batch to the batch size, never encode 997
    copies; a batch that fits stays as given."""
    from conftest import warnings_seen
    from kandinsky_train.batches import cap_batch_size
    from kandinsky_train.cache import at_batch_size

    capped = []
    for rank in range(processes):
        args = SimpleNamespace(train_batch_size=1000)
        with warnings_seen() as seen:
            cap_batch_size(args, FakeAccelerator(rank, processes), 3)
        capped.append(args.train_batch_size)
        share = f" ({cap} per process)" if processes > 1 else ""
        assert seen == [f"--train_batch_size 1000 is more than the 3 training sample(s){share}: training in batches "
                        f"of {cap}, the whole data set each step."]
    assert capped == [cap] * processes
    encoded = []
    at_batch_size(lambda batch: encoded.append(len(batch["x"])) or batch, capped[0])({"x": torch.zeros(cap, 4)})
    assert encoded == [cap]
    kept = SimpleNamespace(train_batch_size=2)
    cap_batch_size(kept, FakeAccelerator(0, processes), 3)
    assert kept.train_batch_size == 2


def test_the_training_loop_caps_the_batch_before_it_builds_anything(monkeypatch):
    """loop.train caps the batch before the Trainer builds its loaders, cache and plan from it; a stream (no
    length) keeps its batch."""
    from kandinsky_train import loop

    class Trainer:
        def __init__(self, args, *rest):
            self.args = args

        def train(self):
            return self.args.train_batch_size

    monkeypatch.setattr(loop, "Trainer", Trainer)
    args = SimpleNamespace(train_batch_size=1000, streaming=False)
    assert loop.train(args, FakeAccelerator(), None, [0, 1, 2], ImageReport()) == 3
    assert loop.train(SimpleNamespace(train_batch_size=1000, streaming=True), FakeAccelerator(), None, iter([]),
                      ImageReport()) == 1000
