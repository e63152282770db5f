# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The training data: the `train` split of --dataset_name or --train_data_dir, checked before any model is loaded
(columns, captions, one decode of every image), and samples the stage turns into tensors (the held-out set is
holdout.py's): each epoch in one of each sample's versions (one of its captions, the picture or its
mirror), at the sample's training shape."""

import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch
from PIL import ImageFile

from .data_checks import check_parquet_shards, explain_load_error, is_url, refuse_urls
from .errors import fail, reason
from .images import MAX_ASPECT, MIN_SIDE, image_name, image_size, odd_shape, open_rgb

logger = logging.getLogger(__name__)


@dataclass
class ImageReport:
    """The images left out of training because they could not be read, named for the log."""

    skipped: list = field(default_factory=list)

    def summary(self):
        if not self.skipped:
            return "all images readable"
        return f"{len(self.skipped)} unreadable image(s) skipped: {', '.join(self.skipped[:20])}" + (
            ", ..." if len(self.skipped) > 20 else "")


def load_training_data(args, accelerator, caption_column=None, splits=("train",)):
    """Load the train split (the first of `splits` the data set has), check its columns and captions, and drop
    unreadable images (reported by name). The main process goes first, so that the other processes find its downloads
    and checks in the datasets cache."""
    with accelerator.main_process_first():
        dataset = load_split(args, splits)
        dataset = _check_columns(dataset, args, caption_column)
        report = ImageReport()
        if not args.skip_image_check:
            dataset = drop_unreadable(dataset, args.image_column, report)
        return dataset, report


def load_split(args, splits, streaming=False):
    """The first of `splits` that --dataset_name or --train_data_dir has (an IterableDataset with `streaming`)."""
    import datasets

    if args.dataset_name is not None:
        if os.path.exists(args.dataset_name):
            check_parquet_shards(args.dataset_name, "--dataset_name")
        try:
            loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                           streaming=streaming)
        except Exception as error:  # datasets raises many types for "not found / offline / bad format"
            fail(explain_load_error(error, args) or
                 f"Could not load --dataset_name {args.dataset_name!r}: {reason(error)}")
    else:
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir,
                                           streaming=streaming)
        except Exception as error:  # typically a malformed metadata.jsonl / metadata.csv
            fail(explain_load_error(error, args) or
                 f"Could not read the image folder --train_data_dir {args.train_data_dir!r} and its metadata file: "
                 f"{reason(error)}")
    for split in splits:
        if split in loaded:
            return loaded[split]
    fail(f"The dataset has no {' or '.join(map(repr, splits))} split (splits: {', '.join(loaded)}).")


def check_column_names(columns, args, caption_column):
    source = args.dataset_name or args.train_data_dir
    for flag, column in (("--image_column", args.image_column), ("--caption_column", caption_column)):
        if column is not None and column not in columns:
            fail(f"{flag} {column!r} is not a column of {source!r}; its columns are: {', '.join(columns)}.")


def column_names(dataset):
    """A data set's columns; a stream of CSV or JSON names them only in its rows, so its first row is read."""
    return dataset.column_names or list(next(iter(dataset), None) or ())


def undecoded(dataset, image_column, folder=None, source=None):
    """The data set with its images left undecoded: the samples decode them through our own loader, so that a bad
    file is reported (or skipped) instead of crashing a worker. A column of file paths (CSV, parquet) is resolved
    against `folder`, the data set's own (see `data_folder`), as datasets resolves an image folder's file names:
    never against the working directory, where a file of the same name would be trained on silently. URLs are
    refused (`source` names the data set): nothing downloads them. A stream of CSV or JSON has no features before
    its rows: its path cells are resolved as they come."""
    import datasets

    unknown = dataset.features is None
    feature = None if unknown else dataset.features.get(image_column)
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    strings = getattr(feature, "dtype", None) in ("string", "large_string")
    if strings and source is not None and not isinstance(dataset, datasets.IterableDataset):
        refuse_urls(dataset[image_column], image_column, source)  # streamed: each skipped as unreadable
    if folder is not None and (unknown or strings):
        return dataset.map(lambda path: {image_column: _resolve(folder, path)}, input_columns=image_column,
                           **({} if isinstance(dataset, datasets.IterableDataset) else {"desc": "Resolving paths"}))
    return dataset


def data_folder(name):
    """The local folder of a --dataset_name (the folder given, or a data file's folder); None for a Hub data set."""
    if name is None or not os.path.exists(name):
        return None
    return os.path.abspath(name if os.path.isdir(name) else os.path.dirname(name))


def _resolve(folder, path):
    if isinstance(path, str) and path and not os.path.isabs(path) and not is_url(path):
        return os.path.normpath(os.path.join(folder, path))
    return path


def _check_columns(dataset, args, caption_column):
    source = args.dataset_name or args.train_data_dir
    check_column_names(dataset.column_names, args, caption_column)
    # Every column stays (each stage reads only its own, see TrainingSamples): both stages then select the same rows
    # the same way, and their data sets share a fingerprint, the key of the shared CLIP image-embedding cache.
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        fail(f"The dataset {source!r} is empty.")
    if caption_column is not None:
        _check_captions(dataset[caption_column], caption_column)
    return undecoded(dataset, args.image_column, data_folder(args.dataset_name), source)


def _check_captions(values, caption_column):
    bad = [i for i, value in enumerate(values) if captions(value) is None]
    if bad:
        fail(f"{len(bad)} sample(s) have a missing or non-string caption in column {caption_column!r} "
             f"(rows {', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''}); fix or drop them.")
    if all(not text.strip() for value in values for text in captions(value)):
        logger.warning(f"Every caption in column {caption_column!r} is empty: the prior will learn one image "
                       "embedding for no words at all. Check --caption_column and the data.")


def captions(value):
    """A caption cell as a list of strings: a string, or a list of them (several captions per image, as many Hub
    data sets have); None for anything else (missing, a number, an empty list, a list holding a non-string)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value):
        return list(value)
    return None


def caption_counts(dataset, caption_column):
    """Captions per sample when some have several (a list in the caption column), else None."""
    counts = [len(captions(value)) for value in dataset[caption_column]]
    return counts if max(counts) > 1 else None


def caption_text(value, variant=0):
    """One caption of a cell: the `variant`-th of its list (see `Variants`)."""
    texts = captions(value)
    return None if texts is None else texts[variant]


def _check_images(values, indices):
    """datasets.map function: for each image, an empty string if it decodes, else why it does not; its size as
    training opens it ((0, 0) if it does not); and its name (the file, or the row of a data set that stores the
    bytes)."""
    errors, sizes = [], []
    for value in values:
        try:
            sizes.append(open_rgb(value).size)
            errors.append("")
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            sizes.append((0, 0))
            errors.append(f"{type(error).__name__}: {error}")
    names = [image_name(value) for value in values]
    return {"unreadable": errors, "size": [list(size) for size in sizes],
            "name": [f"row {i} {name}" if name.startswith("<") else name for i, name in zip(indices, names)]}


def drop_unreadable(dataset, image_column, report, num_proc=None):
    """Decode every image once and keep the readable ones, naming the others in the log. The images stream through
    `datasets.map` (never all in memory at once), in parallel on large data; datasets caches the verdicts, so the
    other processes of a multi-GPU run and later runs on the same data do not decode again."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if num_proc is None:
        num_proc = parallelism(dataset)
    verdicts = dataset.map(_check_images, input_columns=image_column, with_indices=True, batched=True, batch_size=64,
                           remove_columns=dataset.column_names, num_proc=num_proc, desc="Checking images")
    keep = []
    for index, (error, name) in enumerate(zip(verdicts["unreadable"], verdicts["name"])):
        if error:
            report.skipped.append(name)
            logger.warning(f"Skipping unreadable image {name}: {error}")
        else:
            keep.append(index)
    if not keep:
        fail(f"None of the {len(dataset)} images could be read ({report.summary()}).")
    _warn_odd_shapes([(verdicts["name"][i], verdicts["size"][i]) for i in keep])
    if report.skipped:
        dataset = dataset.select(keep)
    return dataset


def _warn_odd_shapes(named_sizes):
    """One warning for pictures that train as something else than they are: tiny ones upscaled many times, or of
    an extreme shape stretched into a bucket or cut down to a sliver of themselves by the crop."""
    odd = [(name, size) for name, size in named_sizes if odd_shape(*size)]
    if odd:
        name, (width, height) = odd[0]
        logger.warning(f"{len(odd)} picture(s) are tiny or of an extreme shape (a side under {MIN_SIDE} px, or one "
                       f"over {MAX_ASPECT} times the other), for example {name} ({width}x{height}): training "
                       "upscales, crops or stretches them into its shapes. Check the data, or drop them.")


def parallelism(dataset):
    """Processes for a pass over every image: parallel ones pay for their start-up only on large data sets."""
    return min(os.cpu_count() or 1, len(dataset) // 2000) or None


def _sizes(values):
    sizes = [image_size(value) for value in values]
    return {"width": [w for w, _ in sizes], "height": [h for _, h in sizes]}


def image_sizes(dataset, image_column):
    """(width, height) of every image, as training opens it, from the files' headers: a streaming pass that
    `datasets` caches for later runs and the other processes."""
    sizes = dataset.map(_sizes, input_columns=image_column, batched=True, batch_size=256,
                        remove_columns=dataset.column_names, num_proc=parallelism(dataset), desc="Reading image sizes")
    return list(zip(sizes["width"], sizes["height"]))


def training_samples(dataset, image_column, stage, seed):
    """The stage's samples of the data set, with their versions (stage.variants) and training shapes
    (stage.shapes) when the stage has them."""
    counts = stage.variants(dataset) if stage.variants else None
    shapes = stage.shapes(dataset) if stage.shapes else None
    return TrainingSamples(dataset, image_column, stage.make_sample, stage.columns, Variants(counts, seed), shapes)


class Variants:
    """Which version of each sample an epoch trains on (one of its captions; the picture or its mirror): drawn per
    sample and epoch from the run's seed, a pure function of (seed, epoch, index), so that a resumed run sees what
    an uninterrupted one sees whatever the number of processes. The epoch lives in shared memory, so that data-loader
    workers (persistent ones too) see `set_epoch`."""

    def __init__(self, counts=None, seed=0):
        self.counts, self.seed = counts, seed  # counts: versions per sample; None: one each
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def count(self, index):
        return 1 if self.counts is None else self.counts[index]

    def pick(self, index):
        return draw_variant(self.seed, int(self._epoch), index, self.count(index))


def draw_variant(seed, epoch, key, count):
    """Which of a sample's `count` versions an epoch trains on: a pure function of (seed, epoch, the sample's key)."""
    if count == 1:
        return 0
    mixed = hashlib.sha256(f"variant/{seed}/{epoch}/{key}".encode()).digest()
    return int.from_bytes(mixed[:8], "little") % count


class TrainingSamples(torch.utils.data.Dataset):
    """Index -> dict of tensors, built by the stage's `make_sample(image, row, variant, shape)` for this epoch's
    version of the sample; keeps the sample index. Rows hold the image and `columns` (what make_sample reads beside
    it) only. `shapes`: each sample's training shape (aspect-ratio buckets), or None; the shape the batches were
    grouped by is the one the sample is made at."""

    def __init__(self, dataset, image_column, make_sample, columns=(), variants=None, shapes=None):
        self.dataset = dataset.select_columns([image_column, *columns])
        self.image_column, self.make_sample = image_column, make_sample
        self.variants, self.shapes = variants or Variants(), shapes

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.variants.set_epoch(epoch)

    def __getitem__(self, index):
        return self.sample(index, self.variants.pick(index))

    def sample(self, index, variant):
        row = self.dataset[index]
        shape = self.shapes[index] if self.shapes else None
        sample = self.make_sample(open_rgb(row[self.image_column]), row, variant, shape)
        sample["index"] = index
        return sample


def collate(samples):
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
