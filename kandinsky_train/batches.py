# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""How samples become micro-batches: the order of each epoch (seeded, so a resumed run sees what an uninterrupted
one sees), the share of each process, and where a resumed epoch starts."""

import torch

from .data import collate


def make_batches(args, accelerator, samples):
    """The batching the command line asks for."""
    return ShuffledBatches(args, accelerator, samples)


class ShuffledBatches:
    """A map-style data set in a fresh random order each epoch: accelerate's seedable sampler (seeded with the run's
    seed and the epoch) and its per-process shards; a resumed epoch skips the micro-batches already consumed."""

    def __init__(self, args, accelerator, samples):
        self.accelerator = accelerator
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
        self.loader.set_epoch(epoch)
        loader = self.accelerator.skip_first_batches(self.loader, start) if start else self.loader
        return enumerate(loader, start=start)
