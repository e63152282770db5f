# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--cache_embeddings: the frozen models' outputs per sample (text embeddings, CLIP image embeddings, MoVQ
latents), computed once for every version of a sample (each caption, the picture and its mirror), stored as
safetensors under a fingerprint of everything they depend on, one file per process and training shape (the latents
of one aspect-ratio bucket share a shape), and read back row by row through memory maps."""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .data import collate
from .runtime import weight_dtype_of

logger = logging.getLogger(__name__)


def frozen_outputs(args, accelerator, stage, samples, data_fingerprint):
    """What the loop trains on, and the encoder it runs on each batch: with --cache_embeddings the cached outputs
    and no encoder (the frozen models leave the GPU), else the raw samples and the stage's encoder."""
    if not args.cache_embeddings:
        return samples, stage.encode
    from datasets.fingerprint import Hasher

    # "layout": caches written before they held every version of a sample lack its "variant" rows
    key = {"data": data_fingerprint, "frozen": model_fingerprint(*stage.frozen_models),
           "dtype": str(weight_dtype_of(accelerator)), "layout": "versions and shapes", **stage.cache_key}
    cache = EmbeddingCache(args.embedding_cache_dir or os.path.join(args.output_dir, "embedding_cache"),
                           Hasher.hash(key))
    if cache.complete():
        logger.info(f"Reusing cached frozen outputs from {cache.folder}")
    else:
        cache.build(accelerator, samples, stage.encode, args.train_batch_size)
    for frozen in stage.frozen_models:  # not needed until validation, which brings back what it uses
        frozen.to("cpu")
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return cache.load(samples), None


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


class EmbeddingCache:
    """The frozen models' outputs per sample, computed once and stored as safetensors under a fingerprint.

    Every process encodes its own slice of each shape's samples (in the training dtype, so the cached values are
    exactly what the uncached path computes), then all processes read all slices.
    """

    def __init__(self, root, fingerprint):
        self.folder = Path(root) / fingerprint[:24]
        self.fingerprint = fingerprint

    def complete(self):
        meta = self.folder / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == self.fingerprint

    def build(self, accelerator, samples, encode, batch_size):
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        rank, world = accelerator.process_index, accelerator.num_processes
        self.folder.mkdir(parents=True, exist_ok=True)
        groups = {}  # training shape -> every (sample, version) of that shape
        for index in range(len(samples)):
            shape = samples.shapes[index] if samples.shapes else None
            groups.setdefault(shape, []).extend((index, v) for v in range(samples.variants.count(index)))
        progress = tqdm(total=sum(len(keys[rank::world]) for keys in groups.values()), disable=not
                        accelerator.is_local_main_process, desc=f"Caching frozen outputs ({rank + 1}/{world})")
        for number, keys in enumerate(groups.values()):
            if keys[rank::world]:
                tensors = self._encode(_Versions(samples, keys[rank::world]), encode, batch_size, progress)
                save_file(tensors, str(self.folder / f"part-{rank:05d}-{number:04d}-of-{world:05d}.safetensors"))
        progress.close()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (self.folder / "meta.json").write_text(json.dumps({"fingerprint": self.fingerprint, "parts": world,
                                                               "samples": len(samples)}))
        accelerator.wait_for_everyone()

    @staticmethod
    def _encode(versions, encode, batch_size, progress):
        """The stage's frozen outputs of some versions of samples that share a shape, as tensors keyed by output,
        with each row's sample index and version."""
        parts = {}
        for batch in torch.utils.data.DataLoader(versions, batch_size=batch_size, collate_fn=collate):
            keys = {"index": batch.pop("index"), "variant": batch.pop("variant")}
            with torch.no_grad():
                out = encode(batch)
            for key, value in {**out, **keys}.items():
                parts.setdefault(key, []).append(value.detach().cpu())
            progress.update(len(keys["index"]))
        return {key: torch.cat(values).contiguous() for key, values in parts.items()}

    def load(self, samples):
        meta = json.loads((self.folder / "meta.json").read_text())
        return CachedSamples(sorted(self.folder.glob(f"part-*-of-{meta['parts']:05d}.safetensors")), samples)


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
    page cache instead of holding a copy each."""

    def __init__(self, files, samples):
        from safetensors import safe_open

        self.files = [str(f) for f in files]
        self.variants, self.shapes, self.size = samples.variants, samples.shapes, len(samples)
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
        number, row = self.location[(index, self.variants.pick(index))]
        part = self._handles[number]
        return {"index": index, **{key: part.get_slice(key)[row] for key in self.keys}}
