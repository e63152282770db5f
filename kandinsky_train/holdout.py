# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""The held-out set: a seeded share of the training rows (--validation_split), the same on every process, resume
and stage, or a separate set (--validation_data_dir / --validation_dataset_name) checked like the training data."""

import argparse
import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from .data import load_training_data
from .errors import fail

logger = logging.getLogger(__name__)


SPLIT_SEED = 16  # fixed: the rows held out depend on the data alone, never on --seed, the stage or the processes


@dataclass
class HeldOut:
    """The held-out set; `split` describes the rows --validation_split took out of training (None for a separate
    set), recorded in checkpoints so that a resume with another split is refused."""

    dataset: object
    split: str = None


def held_out_data(args, accelerator, dataset, caption_column=None):
    """(the rows to train on, HeldOut or None): --validation_split holds out a seeded share of the rows;
    --validation_data_dir / --validation_dataset_name load a separate set, checked like the training data."""
    if args.validation_split is not None:
        train, held_out, split = split_rows(dataset, args.validation_split)
        logger.info(f"Held out for evaluation: {split}")
        return train, HeldOut(held_out, split)
    if args.validation_data_dir is None and args.validation_dataset_name is None:
        return dataset, None
    same = args.validation_dataset_name is not None and args.validation_dataset_name == args.dataset_name
    separate = argparse.Namespace(**{
        **vars(args), "dataset_name": args.validation_dataset_name, "train_data_dir": args.validation_data_dir,
        "dataset_config_name": args.dataset_config_name if same else None, "max_train_samples": None})
    held_out, _ = load_training_data(separate, accelerator, caption_column, splits=("validation", "test", "train"))
    if same and held_out.split == "train":
        fail(f"--validation_dataset_name {args.dataset_name!r} is the training data set and has no validation or "
             "test split: its loss would not measure anything held out. Use --validation_split instead.")
    logger.info(f"Held out for evaluation: the {held_out.split} split of "
                f"{args.validation_dataset_name or args.validation_data_dir!r}, {len(held_out)} samples")
    return dataset, HeldOut(held_out)


def split_rows(dataset, share):
    """(training rows, held-out rows, a description): round(share x rows) rows, at least one, drawn with a fixed
    seed, so that every process, every resume and both stages hold out the same rows of the same data."""
    total = len(dataset)
    count = max(1, round(total * share))
    if count >= total:
        fail(f"--validation_split {share} of {total} sample(s) leaves none to train on; lower it or add data.")
    order = np.random.default_rng(SPLIT_SEED).permutation(total)
    held, train = np.sort(order[:count]), np.sort(order[count:])
    digest = hashlib.sha256(held.astype(np.int64).tobytes()).hexdigest()[:16]
    return dataset.select(train), dataset.select(held), f"{count} of {total} rows (--validation_split, {digest})"
