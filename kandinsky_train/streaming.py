# Copyright 2026 The Kandinsky 2.2 fine-tuning authors. Licensed under the Apache License, Version 2.0.
"""--streaming: data sets larger than the disk, read as a stream of shards (parquet, WebDataset .tar, an image folder)
with `datasets`' IterableDataset. Each process reads its own shards (`split_dataset_by_node`), each data-loader
worker its own share of those, through a shuffle buffer seeded by the run's seed and the epoch. Nothing is checked up
front: an unreadable image or a missing caption is skipped and named as it comes.

Where the stream is goes into each checkpoint: per process and worker, how many raw examples it has consumed this
epoch. A resumed run replays the same seeded stream and passes over those examples without decoding them, so it goes
on at the next sample with the shuffle buffer exactly as it was (`IterableDataset.state_dict()` would restart with an
empty buffer, and so with other samples than an uninterrupted run)."""

import collections
import hashlib
import logging

import torch

from .data import (ImageReport, captions, check_column_names, collate, column_names, data_folder, draw_variant,
                   load_split, load_training_data, undecoded)
from .errors import fail, first_line
from .images import image_name, open_rgb

logger = logging.getLogger(__name__)


def training_data(args, accelerator, caption_column=None):
    """(training data, data.ImageReport): with --streaming a stream, checked as it comes; else the whole data set,
    checked up front (data.load_training_data)."""
    if not args.streaming:
        return load_training_data(args, accelerator, caption_column)
    return load_stream(args, accelerator, caption_column), ImageReport()


def load_stream(args, accelerator, caption_column=None):
    """The train split of --dataset_name (a Hub id or a local folder of shards) or --train_data_dir as an
    IterableDataset, its columns checked, images left undecoded (the samples decode them, so that a bad one is
    skipped instead of stopping the stream), cut to --max_train_samples, and split between the processes."""
    from datasets.distributed import split_dataset_by_node

    source = args.dataset_name or args.train_data_dir
    stream = load_split(args, ("train",), streaming=True)
    check_column_names(column_names(stream), args, caption_column)
    stream = undecoded(stream, args.image_column, data_folder(args.dataset_name), source)
    if args.max_train_samples is not None:
        stream = stream.take(args.max_train_samples)
    if stream.num_shards % accelerator.num_processes:
        processes = accelerator.num_processes
        logger.warning(f"{source!r} has {stream.num_shards} shard(s), not a multiple of the {processes} processes: "
                       f"each process reads every shard and keeps every {processes}-th example. Shard the data in a "
                       "multiple of the processes to read each file once.")
    return split_dataset_by_node(stream, accelerator.process_index, accelerator.num_processes)


class _OneRow:
    """A single row where a stage's `variants` expects a data set (its length and whole columns)."""

    def __init__(self, row):
        self.row = row

    def __len__(self):
        return 1

    def __getitem__(self, column):
        return [self.row[column]]


def sample_id(value):
    """A stable number for an image cell (its bytes, else its path): what the test trace records."""
    if isinstance(value, dict):
        key = value.get("bytes") or (value.get("path") or "").encode()
    else:
        key = str(value).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "little")


class StreamSamples(torch.utils.data.IterableDataset):
    """This process's stream as the stage's samples, in the epoch's seeded order. Each sample also carries which
    worker made it, how many raw examples that worker had read by then ("position"), and how many bad ones it
    skipped just before it. `skip` ({worker: examples}) is where a resumed epoch starts."""

    def __init__(self, stream, args, stage, seed):
        self.stream = stream.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        self.image_column, self.stage, self.seed = args.image_column, stage, seed
        # The prior's caption column; the decoder's other columns are pictures (a hint, a mask) make_sample checks.
        self.caption_column = getattr(args, "caption_column", None)
        self.epoch, self.skip = 0, {}

    def set_epoch(self, epoch, skip=None):
        self.epoch, self.skip = epoch, skip or {}
        self.stream.set_epoch(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        start, skipped = self.skip.get(worker, 0), 0
        for position, row in enumerate(self._rows(), start=1):
            if position <= start:
                continue  # consumed before the checkpoint: passed over, not decoded
            sample = self._sample(row, position)
            if sample is None:
                skipped += 1
                continue
            sample.update(worker=worker, position=position, skipped=skipped)
            skipped = 0
            yield sample

    def _rows(self):
        """The stream's rows; a shard its reader cannot read (a remote one, or a local one whose footer is sound,
        see data_checks.check_parquet_shards) stops the run with one line: datasets' log line names the file."""
        rows = iter(self.stream)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as error:  # pyarrow's ArrowInvalid, OSError... from the shard reader
                fail(f"A shard of the stream could not be read ({type(error).__name__}: {first_line(error)}); the "
                     "log line above names the file. Replace it with a good copy and resume with "
                     "--resume_from_checkpoint latest (without it, the stream is another one: start a new run).")
            yield row

    def _sample(self, row, position):
        value = row[self.image_column]
        name = row.get("__key__") or image_name(value)
        column = self.caption_column
        if column in self.stage.columns and captions(row[column]) is None:
            logger.warning(f"Skipping sample {name}: missing or non-string caption in column {column!r}")
            return None
        try:
            image = open_rgb(value)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            logger.warning(f"Skipping unreadable image {name}: {type(error).__name__}: {error}")
            return None
        index = sample_id(value)
        counts = self.stage.variants(_OneRow(row)) if self.stage.variants else None
        variant = draw_variant(self.seed, self.epoch, index, counts[0] if counts else 1)
        sample = self.stage.make_sample(image, row, variant, None)
        sample["index"] = index
        return sample


class StreamBatches:
    """Micro-batches of the stream. An epoch is one pass over the shards and ends for every process when the first
    one runs out (the processes agree at each micro-batch, so none waits forever in a collective). `position()`
    and `restore()` carry where each process and worker is through a checkpoint."""

    def __init__(self, args, accelerator, samples):
        self.args, self.accelerator, self.samples = args, accelerator, samples
        self.workers = args.dataloader_num_workers
        self.consumed, self.micro, self.total_micro, self.epoch_now, self.skipped = {}, 0, 0, 0, 0
        self.next_worker = 0  # whose batch the loader gives next (it asks its workers in turn)
        self.resume = None
        self.pass_micro = None  # micro-batches of a whole pass, once one has ended
        # The "has every process a batch?" vote runs at each micro-batch on a CPU (gloo) group: on the GPUs' NCCL
        # group it would make the host wait for the GPU every time.
        self.vote_group = None
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            self.vote_group = dist.new_group(backend="gloo")

    def first_micro(self, epoch):
        """Micro-batches of the run before this epoch's first one (the test hooks count micro-batches over the run)."""
        return self.total_micro - self.micro

    def epoch(self, epoch, start=0):
        resume, self.resume = self.resume, None
        rank = self.accelerator.process_index
        if resume is not None and resume["epoch"] == epoch:
            self.consumed = {int(k): v for k, v in resume["consumed"][rank].items()}
            self.micro = resume["micro"]
            self.next_worker = resume.get("next_worker", [0] * (rank + 1))[rank]
        else:
            self.consumed, self.micro, self.next_worker = {}, 0, 0
        self.epoch_now = epoch
        self.samples.set_epoch(epoch, dict(self.consumed))
        device = self.accelerator.device
        loader = torch.utils.data.DataLoader(self.samples, batch_size=self.args.train_batch_size, collate_fn=collate,
                                             num_workers=self.workers, pin_memory=device.type == "cuda")
        return self._agreed(in_turn(iter(loader), self.workers, self.next_worker))

    def _agreed(self, batches):
        from accelerate.utils import send_to_device

        while True:
            batch = next(batches, None)
            if not self._all_have(batch is not None):
                if self.micro == 0:  # every process stops with the others here: no step could ever be taken
                    fail(f"The stream gave {self._who} no sample in pass {self.epoch_now}: nothing to train on. Give "
                         "each process samples of its own (more data, a larger --max_train_samples, or fewer "
                         "processes), or check the log for samples skipped as unreadable.")
                self.pass_micro = self.micro
                return
            worker = int(batch.pop("worker")[0])
            self.consumed[worker] = int(batch.pop("position").max())
            self.next_worker = (worker + 1) % max(self.workers, 1)
            self.skipped += int(batch.pop("skipped").sum())
            self.micro += 1  # counted before the loop sees it: a checkpoint saved in its step includes it
            self.total_micro += 1
            yield self.micro - 1, send_to_device(batch, self.accelerator.device, non_blocking=True)

    @property
    def _who(self):
        processes = self.accelerator.num_processes
        return f"at least one of the {processes} processes" if processes > 1 else "the run"

    def _all_have(self, has_batch):
        if self.accelerator.num_processes == 1:
            return has_batch
        import torch.distributed as dist

        flag = torch.tensor([int(has_batch)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.vote_group)
        return bool(flag)

    def position(self):
        """Where every process is in the epoch (collective: every process calls it at a checkpoint)."""
        from accelerate.utils import gather_object

        consumed = gather_object([{str(k): v for k, v in self.consumed.items()}])
        return {"epoch": self.epoch_now, "micro": self.micro, "total_micro": self.total_micro,
                "workers": self.workers, "consumed": consumed, "pass_micro": self.pass_micro,
                "next_worker": gather_object([self.next_worker])}

    def restore(self, position):
        if position is None:
            return
        if len(position["consumed"]) != self.accelerator.num_processes or position["workers"] != self.workers:
            fail(f"The checkpoint's stream position was recorded with {len(position['consumed'])} process(es) and "
                 f"{position['workers']} data-loader worker(s); resume --streaming with the same numbers (each "
                 "process and worker reads its own shards), or start a new run in another --output_dir.")
        self.resume, self.total_micro = position, position["total_micro"]
        self.pass_micro = position.get("pass_micro")  # older checkpoints lack it

    def passes(self):
        """Passes over the stream so far, the last one in part; None while no pass has reached the stream's end
        (its length is not known before)."""
        return self.epoch_now + self.micro / self.pass_micro if self.pass_micro else None

    def skipped_total(self):
        """Samples skipped (unreadable image, missing caption) on all processes so far."""
        if self.accelerator.num_processes == 1:
            return self.skipped
        return int(self.accelerator.reduce(torch.tensor(self.skipped, device=self.accelerator.device), "sum"))


def in_turn(batches, workers, due):
    """A DataLoader's batches in the order its workers take turns from worker `due` on. A fresh loader asks them in
    turn from worker 0, while the run it resumes was due to ask worker `due` next; each batch waits for its
    worker's turn. The loader passes over a worker that has run out; so a worker it skipped between two batches is
    done, and loses its turn here too."""
    if workers < 2 or due == 0:
        yield from batches
        return
    waiting = {worker: collections.deque() for worker in range(workers)}
    running, last = set(range(workers)), workers - 1
    for batch in batches:
        worker = int(batch["worker"][0])
        running -= {(last + k) % workers for k in range(1, (worker - last) % workers or workers)}
        running.add(worker)
        waiting[worker].append(batch)
        last = worker
        while waiting[due] or due not in running:
            if waiting[due]:
                yield waiting[due].popleft()
            due = (due + 1) % workers
    while any(waiting.values()):  # the loader is done: every worker has run out
        if waiting[due]:
            yield waiting[due].popleft()
        due = (due + 1) % workers
