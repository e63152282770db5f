# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What is wrong with a data set that `datasets` cannot load, or would load into something other than the user
meant, said in words that name the file, line or folder to fix: a bad line of a metadata.jsonl, a shard that is not
parquet, a datasets cache that cannot be written, a column of URLs (never downloaded)."""

import json
import os
import re
from pathlib import Path

from .errors import fail, first_line

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(value):
    return isinstance(value, str) and URL.match(value) is not None


def refuse_urls(values, column, source):
    """A column of paths that holds URLs: they are not downloaded (datasets does not fetch a CSV's strings either),
    and joined to the data set's folder they would only name missing files."""
    rows = [i for i, value in enumerate(values) if is_url(value)]
    if rows:
        fail(f"--image_column {column!r} of {source!r} holds URLs ({len(rows)} row(s), the first row {rows[0]}: "
             f"{values[rows[0]]!r}): pictures are not downloaded. Download them first (img2dataset, for example) "
             "and give their local paths (relative to the data set's folder).")


def check_parquet_shards(name, flag):
    """Every parquet file of a local data set (a folder, or one file) has a parquet footer (read alone: cheap), so
    that a stray or partly downloaded file is named before any model loads rather than met as an ArrowInvalid in the
    middle of a run."""
    import pyarrow.parquet as pq

    files = sorted(Path(name).rglob("*.parquet")) if os.path.isdir(name) else [Path(name)]
    for path in (path for path in files if path.suffix == ".parquet"):
        try:
            pq.read_metadata(path)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError... for a file that is not parquet
            fail(f"{flag} {name!r}: the shard {str(path)!r} is not a readable parquet file ({type(error).__name__}: "
                 f"{first_line(error).rstrip('.')}). Replace it (a partial download?) or move it out of the data set's folder.")


def explain_load_error(error, args):
    """One line for what a failed `load_dataset` was about, when it is not the data set itself; else None."""
    return _unwritable_cache(error, args) or (_metadata_line(args.train_data_dir) if args.train_data_dir else None)


def _unwritable_cache(error, args):
    import datasets

    cause = error
    while cause is not None and not (isinstance(cause, OSError) and cause.filename):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    root = os.path.realpath(os.path.expanduser(args.cache_dir or str(datasets.config.HF_DATASETS_CACHE)))
    where = os.path.realpath(str(cause.filename))
    if os.path.commonpath([root, where]) not in (root, where):  # neither in the cache nor a folder above it
        return None
    source = "--cache_dir" if args.cache_dir else next(
        (name for name in ("HF_DATASETS_CACHE", "HF_HOME") if os.environ.get(name)), "its default place")
    advice = ("Give --cache_dir a folder you can write to" if args.cache_dir else
              "Set HF_DATASETS_CACHE (or HF_HOME) to a folder you can write to, or give --cache_dir")
    return (f"The datasets cache {root!r} ({source}) cannot be written ({cause.strerror or cause}): datasets "
            f"prepares every data set there, local ones too. {advice}.")


def _metadata_line(folder):
    """The first line of an image folder's metadata.jsonl files that is not JSON, named by file and line (from 1)."""
    for path in sorted(Path(folder).rglob("metadata.jsonl")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None  # datasets' own words say it better
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return (f"Could not read the image folder --train_data_dir {folder!r}: {str(path)!r} line {number} "
                        f"is not JSON ({error.msg}, column {error.colno}); each line is one object such as "
                        '{"file_name": "0001.png", "text": "a caption"}.')
    return None
