# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--cache_embeddings: the frozen models' outputs per sample (text embeddings, CLIP image embeddings, MoVQ
latents), computed once, stored as safetensors under a fingerprint of everything they depend on, and read back row
by row through memory maps."""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from . import storage
from .data import collate
from .runtime import weight_dtype_of

logger = logging.getLogger(__name__)


def frozen_outputs(args, accelerator, stage, samples, data_fingerprint):
    """What the loop trains on, and the encoder it runs on each batch: with --cache_embeddings the cached outputs
    and no encoder (the frozen models leave the GPU), else the raw samples and the stage's encoder."""
    if not args.cache_embeddings:
        return samples, stage.encode
    from datasets.fingerprint import Hasher

    key = {"data": data_fingerprint, "frozen": model_fingerprint(*stage.frozen_models),
           "dtype": str(weight_dtype_of(accelerator)), **stage.cache_key}
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
    return cache.load(), None


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

    Every process encodes its own slice of the samples (in the training dtype, so the cached values are
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
        mine = list(range(rank, len(samples), world))
        self.folder.mkdir(parents=True, exist_ok=True)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(samples, mine), batch_size=batch_size,
                                             collate_fn=collate, num_workers=0)
        parts = {}
        for batch in tqdm(loader, desc=f"Caching frozen outputs ({rank + 1}/{world})",
                          disable=not accelerator.is_local_main_process):
            index = batch.pop("index")
            with torch.no_grad():
                out = encode(batch)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.detach().cpu())
            parts.setdefault("index", []).append(index)
        tensors = {key: torch.cat(values).contiguous() for key, values in parts.items()}
        part = self.folder / f"part-{rank:05d}-of-{world:05d}.safetensors"
        with storage.writing("the embedding cache", self.folder, storage.tensor_bytes(tensors.values()), partial=part,
                             advice="Free some space, or give --embedding_cache_dir on a larger disk, and run again."):
            save_file(tensors, str(part))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (self.folder / "meta.json").write_text(json.dumps({"fingerprint": self.fingerprint, "parts": world,
                                                               "samples": len(samples)}))
        accelerator.wait_for_everyone()

    def load(self):
        meta = json.loads((self.folder / "meta.json").read_text())
        return CachedSamples(sorted(self.folder.glob(f"part-*-of-{meta['parts']:05d}.safetensors")))


class CachedSamples(torch.utils.data.Dataset):
    """The cached outputs of each sample, read row by row from the memory-mapped safetensors files: a cache larger
    than RAM works, and the processes of a multi-GPU run share the page cache instead of holding a copy each."""

    def __init__(self, files):
        from safetensors import safe_open

        self.files = [str(f) for f in files]
        self.location = {}  # sample index -> (file, row)
        for number, path in enumerate(self.files):
            with safe_open(path, "pt") as part:
                for row, index in enumerate(part.get_tensor("index").tolist()):
                    self.location[index] = (number, row)
                self.keys = [key for key in part.keys() if key != "index"]
        self._handles, self._pid = None, None

    def __getstate__(self):  # data-loader workers started with "spawn" get a copy without the open files
        return {**self.__dict__, "_handles": None, "_pid": None}

    def __len__(self):
        return len(self.location)

    def __getitem__(self, index):
        from safetensors import safe_open

        if self._pid != os.getpid():  # open the files once in each process (data-loader workers are forked)
            self._handles, self._pid = [safe_open(path, "pt") for path in self.files], os.getpid()
        number, row = self.location[index]
        part = self._handles[number]
        return {"index": index, **{key: part.get_slice(key)[row] for key in self.keys}}
