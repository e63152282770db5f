# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--cache_embeddings: the frozen models' outputs per sample (text embeddings, CLIP image embeddings, MoVQ
latents), computed once for every version of a sample (each caption, the picture and its mirror), stored as
safetensors under a fingerprint of everything they depend on, one file per process and training shape (the latents
of one aspect-ratio bucket share a shape), and read back row by row through memory maps. The CLIP image embeddings
are an entry of their own, which both stages share."""

import json
import logging
import os
from pathlib import Path

import torch

from . import runtime, storage
from .data import collate
from .fingerprints import model_fingerprint, picture_files_fingerprint
from .stage import FrozenPart

logger = logging.getLogger(__name__)


def frozen_parts(stage):
    """The stage's frozen outputs in the parts cached apart: the CLIP image embeddings (shared by both stages) and
    the stage's own (the prior's text embeddings, the decoder's MoVQ latents)."""
    return [part for part in (stage.image_embedding, FrozenPart("frozen outputs", stage.encode, stage.frozen_models,
                                                                {"stage": stage.name, **stage.cache_key},
                                                                picture_columns=stage.picture_columns)) if part]


def frozen_outputs(args, accelerator, stage, sample_sets):
    """What the loop trains and evaluates on, and the encoder it runs on each batch. sample_sets: (samples, data
    fingerprint) pairs, the training set and the held-out one. With --cache_embeddings: the cached outputs of each
    set and no encoder (the frozen models wait on the CPU, runtime.frozen_device); else the raw samples and the
    stage's encoders."""
    parts = frozen_parts(stage)
    if not args.cache_embeddings:
        batch_size = encoding_batch_size(accelerator.device, args.train_batch_size)
        return [samples for samples, _ in sample_sets], at_batch_size(encode_all(parts), batch_size)
    from datasets.fingerprint import Hasher

    root = args.embedding_cache_dir or os.path.join(args.output_dir, "embedding_cache")
    # Each part under its own key: the CLIP image embeddings' key is the same in both stages for the same images,
    # versions, encoder, processor and dtype, so the second stage finds the first one's and never runs the tower.
    # "layout": caches written before they held every version of a sample lack its "variant" rows.
    keys = [{"part": part.name, "frozen": model_fingerprint(*part.models), "image_column": args.image_column,
             "dtype": str(runtime.weight_dtype_of(accelerator)), "layout": "versions and shapes", **part.key}
            for part in parts]
    loaded = []
    for samples, data_fingerprint in sample_sets:
        pictures = picture_files_fingerprint(samples.dataset, samples.image_column)
        caches = []
        for part, key in zip(parts, keys):
            rows = rows_per_sample(samples, part)
            # a mask or hint edited in place, like a picture, must rebuild the entry (absent: the keys of before)
            paired = {"paired pictures": picture_files_fingerprint(samples.dataset, *part.picture_columns)
                      } if part.picture_columns else {}
            caches.append(EmbeddingCache(root, Hasher.hash({"data": data_fingerprint, "pictures": pictures,
                                                            "rows per sample": rows, **paired, **key})))
            if caches[-1].complete():
                logger.info(f"Reusing cached {part.name} from {caches[-1].folder}")
                continue
            # A pass over the data for each part, its models alone on the device: decoding the pictures again
            # costs less than holding a second tower.
            with runtime.on_device(accelerator.device, *part.models):
                build(accelerator, samples, [(caches[-1], part.encode)],
                      encoding_batch_size(accelerator.device, args.train_batch_size), rows)
        loaded.append(JoinedSamples([cache.load(samples, part.per_version) for part, cache in zip(parts, caches)]))
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return loaded, None


def rows_per_sample(samples, part):
    """A part's cached versions of each sample: every version, or one where they share its outputs (the CLIP image
    embedding of a picture with several captions: the decoder's entry then serves the prior, and the other way)."""
    return [samples.variants.count(i) if part.per_version else 1 for i in range(len(samples))]


def encoding_batch_size(device, train_batch_size):
    """How many samples the frozen models encode at once, cached or not. On the CPU one: PyTorch's CPU matrix
    products (2.14 at least) round a row differently by its place in the batch (the tail of a block takes another
    kernel), so a sample's outputs would change with its batch partners and its position; alone, it gets the same
    bits in the cache as in training. On a GPU the training batch, for speed."""
    return 1 if device.type == "cpu" else train_batch_size


def at_batch_size(encode, batch_size):
    """`encode` run on batches of exactly `batch_size` samples: a larger batch in slices, a smaller one (or the last
    slice) padded with copies of its last sample (their outputs dropped). The frozen models give a sample the same
    bits at one batch size whatever else is in the batch (see encoding_batch_size), but not at two; so the cache,
    built in batches of its own, holds exactly what training and evaluation compute from their batches, the short
    last ones (odd counts, buckets) included."""

    def encode_slice(batch):
        size = len(next(iter(batch.values())))
        if size == batch_size:
            return encode(batch)
        padded = {key: torch.cat([value, value[-1:].expand(batch_size - size, *value.shape[1:])])
                  for key, value in batch.items()}
        return {key: value[:size] for key, value in encode(padded).items()}

    def encode_padded(batch):
        size = len(next(iter(batch.values())))
        slices = [encode_slice({key: value[start:start + batch_size] for key, value in batch.items()})
                  for start in range(0, size, batch_size)]
        return slices[0] if len(slices) == 1 else {key: torch.cat([out[key] for out in slices]) for key in slices[0]}

    return encode_padded


def encode_all(parts):
    """One encoder for every part's outputs (the uncached path runs it on each batch)."""

    def encode(batch):
        outputs = {}
        for part in parts:
            outputs.update(part.encode(batch))
        return outputs

    return encode


def build(accelerator, samples, caches, batch_size, rows=None):
    """Encode this process's share of the samples' versions (the first rows[i] of sample i; default: all), one
    training shape at a time (each image decoded once per version), with the encoder of every (EmbeddingCache,
    encode) pair, in the training dtype and batch size (so the cached values are exactly what the uncached path
    computes); then each cache writes its parts."""
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    groups = {}  # training shape -> every (sample, version) of that shape
    for index in range(len(samples)):
        shape = samples.shapes[index] if samples.shapes else None
        versions = samples.variants.count(index) if rows is None else rows[index]
        groups.setdefault(shape, []).extend((index, v) for v in range(versions))
    progress = tqdm(total=sum(len(keys[rank::world]) for keys in groups.values()), disable=not
                    accelerator.is_local_main_process, desc=f"Caching frozen outputs ({rank + 1}/{world})")
    for number, keys in enumerate(groups.values()):
        if not keys[rank::world]:
            continue
        outputs = [{} for _ in caches]
        loader = torch.utils.data.DataLoader(_Versions(samples, keys[rank::world]), batch_size=batch_size,
                                             collate_fn=collate)
        for batch in loader:
            rows = {"index": batch.pop("index"), "variant": batch.pop("variant")}
            for (_, encode), tensors in zip(caches, outputs):
                with torch.no_grad():
                    out = at_batch_size(encode, batch_size)(batch)
                for key, value in {**out, **rows}.items():
                    tensors.setdefault(key, []).append(value.detach().cpu())
            progress.update(len(rows["index"]))
        for (cache, _), tensors in zip(caches, outputs):
            cache.write_part(accelerator, {key: torch.cat(values).contiguous() for key, values in tensors.items()},
                             number)
    progress.close()
    for cache, _ in caches:
        cache.finish(accelerator, len(samples))


class EmbeddingCache:
    """The frozen models' outputs per sample, computed once and stored as safetensors under a fingerprint: one part
    file per process and training shape (each process encodes its own slice), read by all processes."""

    def __init__(self, root, fingerprint):
        self.folder = Path(root) / fingerprint[:24]
        self.fingerprint = fingerprint

    def complete(self):
        meta = self.folder / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == self.fingerprint

    def write_part(self, accelerator, tensors, number):
        from safetensors.torch import save_file

        rank, world = accelerator.process_index, accelerator.num_processes
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f"part-{rank:05d}-{number:04d}-of-{world:05d}.safetensors"
        with storage.writing("the embedding cache", self.folder, storage.tensor_bytes(tensors.values()), partial=part,
                             advice="Free some space, or give --embedding_cache_dir on a larger disk, and run again."):
            save_file(tensors, str(part))

    def finish(self, accelerator, num_samples):
        """Once every process has written its parts, the main process writes the record that completes the cache."""
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "meta.json").write_text(json.dumps({
                "fingerprint": self.fingerprint, "parts": accelerator.num_processes, "samples": num_samples}))
        accelerator.wait_for_everyone()

    def load(self, samples, per_version=True):
        meta = json.loads((self.folder / "meta.json").read_text())
        return CachedSamples(sorted(self.folder.glob(f"part-*-of-{meta['parts']:05d}.safetensors")), samples,
                             per_version)


class _Versions(torch.utils.data.Dataset):
    """Given versions of samples, each with its sample index and version number."""

    def __init__(self, samples, keys):
        self.samples, self.keys = samples, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        index, variant = self.keys[i]
        return {**self.samples.sample(index, variant), "variant": variant}


class CachedSamples(torch.utils.data.Dataset):
    """The cached outputs of each sample, in this epoch's version (as `samples` draws them), read row by row from the
    memory-mapped safetensors files: a cache larger than RAM works, and the processes of a multi-GPU run share the
    page cache instead of holding a copy each. Without `per_version`, one row serves every version of a sample."""

    def __init__(self, files, samples, per_version=True):
        from safetensors import safe_open

        self.files = [str(f) for f in files]
        self.variants, self.shapes, self.size = samples.variants, samples.shapes, len(samples)
        self.per_version = per_version
        self.location = {}  # (sample index, version) -> (file, row)
        for number, path in enumerate(self.files):
            with safe_open(path, "pt") as part:
                keys = zip(part.get_tensor("index").tolist(), part.get_tensor("variant").tolist())
                for row, key in enumerate(keys):
                    self.location[key] = (number, row)
                self.keys = [key for key in part.keys() if key not in ("index", "variant")]
        self._handles, self._pid = None, None

    def __getstate__(self):  # data-loader workers started with "spawn" get a copy without the open files
        return {**self.__dict__, "_handles": None, "_pid": None}

    def __len__(self):
        return self.size

    def set_epoch(self, epoch):
        self.variants.set_epoch(epoch)

    def __getitem__(self, index):
        from safetensors import safe_open

        if self._pid != os.getpid():  # open the files once in each process (data-loader workers are forked)
            self._handles, self._pid = [safe_open(path, "pt") for path in self.files], os.getpid()
        number, row = self.location[(index, self.variants.pick(index) if self.per_version else 0)]
        part = self._handles[number]
        return {"index": index, **{key: part.get_slice(key)[row] for key in self.keys}}


class JoinedSamples(torch.utils.data.Dataset):
    """The cached parts of the same samples, read as one sample (in the same version: the parts share `variants`)."""

    def __init__(self, parts):
        self.parts = parts
        self.variants, self.shapes = parts[0].variants, parts[0].shapes

    def set_epoch(self, epoch):
        self.variants.set_epoch(epoch)

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, index):
        sample = {}
        for part in self.parts:
            sample.update(part[index])
        return sample
