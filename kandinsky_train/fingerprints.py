# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""What a cache entry is keyed on besides the flags: the frozen models' weights, and the picture files a data set
names as they are now (the `datasets` fingerprint alone misses a picture changed under the same name)."""

import hashlib
import json
import os


def model_fingerprint(*models):
    """Config plus a strided sample of every weight: cheap, and any fine-tune changes it."""
    digest = hashlib.sha256()
    for model in models:
        config = getattr(model, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def picture_files_fingerprint(dataset, *columns):
    """The size, modification time and change time of every picture file that `columns` (the image column; masks,
    hints) name (a path cell, or an image cell that holds a path and no bytes; pictures stored in the data set are
    its fingerprint's). The data set's fingerprint stays when a file of an image folder is replaced keeping its
    modification time (cp -p, rsync -a, tar x), or a file named by a CSV or parquet column of paths is edited; the
    change time cannot be set back, so either shows here. One stat per file, no reading: a copy of the data
    elsewhere (new change times) builds the cache again."""
    digest = hashlib.sha256()
    for column in columns:
        for paths in _file_paths(dataset, column):
            for path in paths:
                digest.update(f"{path}|{_stamp(path)}\n".encode())
    return digest.hexdigest()


def _file_paths(dataset, image_column):
    """Per batch of rows, the file each image cell names, or None (bytes in the cell), read from the Arrow
    table without loading stored pictures into Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for table in dataset.select_columns([image_column]).with_format("arrow").iter(batch_size=4096):
        column = table.column(image_column)
        if pa.types.is_struct(column.type):  # datasets' Image feature: {bytes, path}
            column = pc.if_else(pc.is_null(pc.struct_field(column, "bytes")), pc.struct_field(column, "path"), None)
        elif not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            return
        yield column.to_pylist()


def _stamp(path):
    if path is None:
        return "in the data set"
    try:
        stat = os.stat(path)
    except OSError as error:  # training names the missing file; here it only keys the cache
        return type(error).__name__
    return f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns}"
