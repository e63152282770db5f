# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""How samples become micro-batches: the order of each epoch (seeded, so a resumed run sees what an uninterrupted
one sees), the share of each process, and where a resumed epoch starts."""

import logging
import math

import torch

from .buckets import epoch_order
from .data import collate

logger = logging.getLogger(__name__)


def cap_batch_size(args, accelerator, num_samples):
    """A --train_batch_size above the samples a process gets in an epoch is capped to them: a micro-batch never holds
    more, and the frozen encoders, which run on whole batches (short ones padded, cache.at_batch_size), would
    otherwise encode the padding. Every process computes the same cap from the same count."""
    share = math.ceil(num_samples / accelerator.num_processes)
    if args.train_batch_size <= share:
        return
    logger.warning(f"--train_batch_size {args.train_batch_size} is more than the {num_samples} training sample(s)"
                   f"{f' ({share} per process)' if accelerator.num_processes > 1 else ''}: training in batches of "
                   f"{share}, the whole data set each step.")
    args.train_batch_size = share


def make_batches(args, accelerator, samples):
    """The batching the command line asks for: samples with training shapes come from --enable_bucket."""
    if samples.shapes is not None:
        return BucketBatches(args, accelerator, samples)
    return ShuffledBatches(args, accelerator, samples)


class _Batches:
    """What the loop asks of every batching besides its epochs: where an epoch starts in the run's micro-batches
    (for the test hooks) and a position for the checkpoint (none: the step says where a data set of fixed length is)."""

    def first_micro(self, epoch):
        return epoch * len(self)

    def position(self):
        return None

    def restore(self, position):
        pass


class ShuffledBatches(_Batches):
    """A map-style data set in a fresh random order each epoch: accelerate's seedable sampler (seeded with the run's
    seed and the epoch) and its per-process shards; a resumed epoch skips the micro-batches already consumed."""

    def __init__(self, args, accelerator, samples):
        self.accelerator, self.samples = accelerator, samples
        device = accelerator.device
        self.loader = accelerator.prepare(torch.utils.data.DataLoader(
            samples, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
            num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda",
            persistent_workers=args.dataloader_num_workers > 0))

    def __len__(self):
        """Micro-batches per epoch on each process."""
        return len(self.loader)

    def epoch(self, epoch, start=0):
        """(micro-batch index, batch) of one epoch, from micro-batch `start` on."""
        self.samples.set_epoch(epoch)  # the epoch's version of each sample
        self.loader.set_epoch(epoch)
        loader = self.accelerator.skip_first_batches(self.loader, start) if start else self.loader
        return enumerate(loader, start=start)


class BucketBatches(_Batches):
    """--enable_bucket: every micro-batch holds samples of one training shape (`samples.shapes`). Each process
    builds its own share of the epoch's order (`buckets.epoch_order`, a pure function of seed and epoch) and hands
    it to an accelerate DataLoaderShard as its batch sampler: the loader places batches on the device and tells
    gradient accumulation where the epoch ends, and, not being passed through `accelerator.prepare`, is not sharded
    a second time (accelerate's BatchSamplerShard would fill a short batch with samples of other shapes)."""

    def __init__(self, args, accelerator, samples):
        from accelerate.data_loader import DataLoaderShard

        self.samples = samples
        self.sampler = _EpochBatches(samples.shapes, args.train_batch_size, accelerator.dataloader_config.data_seed,
                                     accelerator.num_processes, accelerator.process_index)
        device = accelerator.device
        self.loader = DataLoaderShard(
            samples, device=device, batch_sampler=self.sampler, collate_fn=collate,
            num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda",
            persistent_workers=args.dataloader_num_workers > 0,
            _non_blocking=accelerator.dataloader_config.non_blocking)

    def __len__(self):
        """Micro-batches per epoch on each process (the same on every process)."""
        return self.sampler.per_process

    def epoch(self, epoch, start=0):
        """(micro-batch index, batch) of one epoch, from micro-batch `start` on."""
        self.sampler.position = (epoch, start)
        self.samples.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        return enumerate(self.loader, start=start)


class _EpochBatches(torch.utils.data.Sampler):
    """This process's micro-batches of the epoch and from the micro-batch that `position` names. (No `set_epoch`
    here: the DataLoaderShard would call it with its own count of iterations.)"""

    def __init__(self, shapes, batch_size, seed, num_processes, rank):
        self.shapes, self.batch_size, self.seed = shapes, batch_size, seed
        self.num_processes, self.rank = num_processes, rank
        self.per_process = len(epoch_order(shapes, batch_size, seed, 0, num_processes)[rank])
        self.position = (0, 0)

    def __len__(self):
        return self.per_process - self.position[1]

    def __iter__(self):
        epoch, start = self.position
        yield from epoch_order(self.shapes, self.batch_size, self.seed, epoch, self.num_processes)[self.rank][start:]
