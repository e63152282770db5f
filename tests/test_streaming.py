"""--streaming: parquet and WebDataset shards read as a stream, each process its own shards, bad samples skipped
as they come, and a stopped run resumed at the next sample of the stream."""

import io
import json
import re
import shutil
import tarfile

import pytest

from conftest import DECODER_SCRIPT, PRIOR_SCRIPT, base_args, checkpoints, launch, offline_env, read_state
from test_robustness import DDP, assert_same_state, state_of, trace


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of four pictures each, as WebDataset .tar files; as parquet files, four shards of unequal sizes
    (6, 4, 4 and 5 rows, picture 00016.png without a caption), so that two processes run out at different times."""
    import tiny_kandinsky

    root = tmp_path_factory.mktemp("shards")
    return {"parquet": tiny_kandinsky.build_parquet_shards(root / "parquet", sizes=(6, 4, 4, 5), no_caption=(16,)),
            "webdataset": tiny_kandinsky.build_webdataset_shards(root / "webdataset")}


def by_rank_and_epoch(records):
    seen = {}
    for record in records:
        seen.setdefault((record["rank"], record["epoch"]), []).extend(record["index"])
    return seen


def test_two_processes_stream_their_own_parquet_shards_and_a_stopped_run_resumes_at_the_next_sample(
        tiny, shards, tmp_path):
    # 18 captioned pictures in 4 shards of unequal sizes: each of the 2 processes reads 2 shards, one per data-loader
    # worker, through a shuffle buffer; in batches of 2, one process has 5 batches a pass and the other 4 (one
    # picture has no caption): a pass ends for both after 4, so 4 steps an epoch, and --num_train_epochs 2 ends the
    # run at step 8, before --max_train_steps.
    common = {"--train_data_dir": None, "--dataset_name": shards["parquet"], "--streaming": True,
              "--shuffle_buffer_size": 3, "--dataloader_num_workers": 2, "--checkpointing_steps": 4,
              "--lr_scheduler": "cosine", "--num_train_epochs": 2}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    first = launch(PRIOR_SCRIPT, base_args(tiny, whole, steps=100, **common), launcher=DDP, timeout=900,
                   env=offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "whole.jsonl")))
    assert checkpoints(whole) == ["checkpoint-4", "checkpoint-8"] and (whole / "model_index.json").is_file()
    text = first.stdout + first.stderr
    assert "Skipping sample 00016.png: missing or non-string caption in column 'text'" in text
    # SIGTERM to rank 0 before the run's 6th micro-batch (the 2nd of epoch 1): both stop at the next agreed step
    stopped = launch(PRIOR_SCRIPT, base_args(tiny, parts, steps=100, **common), launcher=DDP, timeout=900,
                     env=offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_FAULT="micro:5:TERM",
                                     KANDINSKY_TRAIN_FAULT_RANK="0", KANDINSKY_TRAIN_TRACE=str(tmp_path / "p1.jsonl")))
    step = int(re.search(r"Received SIGTERM: saved checkpoint-(\d+)", stopped.stdout + stopped.stderr)[1])
    assert 4 < step < 8  # in the middle of epoch 1
    position = read_state(parts / f"checkpoint-{step}")["stream"]
    assert position["epoch"] == 1 and position["micro"] == step - 4 and len(position["consumed"]) == 2
    resumed = launch(PRIOR_SCRIPT, base_args(tiny, parts, steps=100, **common,
                                             **{"--resume_from_checkpoint": "latest"}),
                     launcher=DDP, timeout=900,
                     env=offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "p2.jsonl")))
    assert "identical on all 2 processes" in resumed.stdout + resumed.stderr
    assert checkpoints(parts) == ["checkpoint-4", f"checkpoint-{step}", "checkpoint-8"]
    whole_seen = by_rank_and_epoch(trace(tmp_path / "whole.jsonl"))
    parts_seen = by_rank_and_epoch(trace(tmp_path / "p1.jsonl") + trace(tmp_path / "p2.jsonl"))
    assert parts_seen == whole_seen  # the resumed run saw exactly the samples the stopped one had not
    assert_same_state(state_of(whole / "checkpoint-8", "prior"), state_of(parts / "checkpoint-8", "prior"), ema=False)
    for epoch in (0, 1):  # both passes end together: 4 batches on each process, from its own shards
        rank0, rank1 = whole_seen[(0, epoch)], whole_seen[(1, epoch)]
        assert len(rank0) == len(rank1) == 8 and len(set(rank0) | set(rank1)) == 16
    assert whole_seen[(0, 0)] != whole_seen[(0, 1)]  # each epoch in its own order


def test_webdataset_shards_skip_a_corrupt_sample_and_name_it(tiny, shards, tmp_path):
    corrupt = tmp_path / "webdataset"
    shutil.copytree(shards["webdataset"], corrupt)
    shard = corrupt / "shard-00001.tar"
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name == "01002.jpg":
                payload = b"not a jpeg"
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    out = tmp_path / "out"
    proc = launch(DECODER_SCRIPT, base_args(tiny, out, steps=4, **{
        "--train_data_dir": None, "--dataset_name": corrupt, "--streaming": True, "--image_column": "jpg",
        "--num_train_epochs": 1}), launcher=DDP,
        env=offline_env(ACCELERATE_USE_CPU="true", KANDINSKY_TRAIN_TRACE=str(tmp_path / "trace.jsonl")))
    text = proc.stdout + proc.stderr
    assert re.search(r"Skipping unreadable image 01002: UnidentifiedImageError", text)
    assert "Data: 1 sample(s) skipped (unreadable image or missing caption), each named in the log" in text
    seen = by_rank_and_epoch(trace(tmp_path / "trace.jsonl"))
    # one pass (--num_train_epochs 1): each rank reads two of the four shards, one rank less the corrupt sample
    assert sorted([len(seen[(0, 0)]), len(seen[(1, 0)])]) == [7, 8] and not set(seen[(0, 0)]) & set(seen[(1, 0)])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "KandinskyV22Pipeline"


def test_one_process_streams_an_image_folder_and_resumes_exactly(tiny, tmp_path):
    # 8 pictures in one folder (one shard), batches of 2: 4 steps an epoch; stopped in epoch 1, resumed
    held_out = tmp_path / "held_out"  # a separate held-out set works with a stream (a split would not)
    shutil.copytree(tiny["images"], held_out)
    common = {"--streaming": True, "--shuffle_buffer_size": 4, "--checkpointing_steps": 3, "--random_flip": True,
              "--validation_data_dir": held_out, "--validation_steps": 3}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    first = launch(DECODER_SCRIPT, base_args(tiny, whole, steps=6, **common))
    assert "Evaluating a held-out set of 8 samples" in first.stdout + first.stderr
    stopped = launch(DECODER_SCRIPT, base_args(tiny, parts, steps=6, **common),
                     env=offline_env(KANDINSKY_TRAIN_FAULT="micro:4:TERM"))
    assert "Received SIGTERM: saved checkpoint-5" in stopped.stdout + stopped.stderr
    assert read_state(parts / "checkpoint-5")["stream"]["consumed"] == [{"0": 2}]  # one batch into epoch 1

    # Refused before any folder is touched: checkpoint-5, newer than the one named, stays where it is.
    refused = launch(DECODER_SCRIPT, base_args(tiny, parts, steps=6, **common, **{
        "--resume_from_checkpoint": "checkpoint-3", "--dataloader_num_workers": 1}), check=False)
    assert refused.returncode != 0  # the launcher's code for the script's 2
    assert ("The checkpoint's stream position was recorded with 1 process(es) and 0 data-loader worker(s); resume "
            "--streaming with the same numbers") in refused.stderr
    assert sorted(p.name for p in parts.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-5"]
    launch(DECODER_SCRIPT, base_args(tiny, parts, steps=6, **common, **{"--resume_from_checkpoint": "latest"}))
    assert checkpoints(parts) == ["checkpoint-3", "checkpoint-5", "checkpoint-6"]
    assert_same_state(state_of(whole / "checkpoint-6", "unet"), state_of(parts / "checkpoint-6", "unet"), ema=False)


def test_the_stream_order_is_the_seeds_and_the_epochs(shards):
    """One process's stream, in-process: the same seed and epoch give the same order, another seed or another epoch
    another order of the same samples."""
    from types import SimpleNamespace

    import train_text_to_image_prior as prior
    from fakes import FakeAccelerator
    from kandinsky_train.streaming import StreamSamples, load_stream

    args = prior.parse_args(["--dataset_name", shards["parquet"], "--streaming", "--max_train_steps", "4",
                             "--shuffle_buffer_size", "3"])
    stage = SimpleNamespace(columns=(), variants=None, make_sample=lambda image, row, variant, shape: {})

    def order(seed, epoch):
        samples = StreamSamples(load_stream(args, FakeAccelerator()), args, stage, seed)
        samples.set_epoch(epoch)
        return [sample["index"] for sample in samples]

    first = order(0, 0)
    assert len(first) == 19 and first == order(0, 0)
    for other in (order(1, 0), order(0, 1)):
        assert other != first and sorted(other) == sorted(first)


def test_two_workers_resume_at_an_odd_micro_batch_in_the_stopped_runs_turn(tiny, shards, tmp_path):
    """A fresh DataLoader asks its workers in turn from worker 0; after 3 micro-batches the stopped run was due to
    ask worker 1. The resumed run keeps the stopped run's turn: the same samples, the same weights."""
    # 16 pictures in 4 shards, one process, 2 workers of 2 shards each, batches of 2: 8 micro-batches a pass
    common = {"--train_data_dir": None, "--dataset_name": shards["parquet"], "--streaming": True,
              "--shuffle_buffer_size": 3, "--dataloader_num_workers": 2, "--checkpointing_steps": 3}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(PRIOR_SCRIPT, base_args(tiny, whole, steps=6, **common),
           env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "whole.jsonl")))
    assert read_state(whole / "checkpoint-3")["stream"]["next_worker"] == [1]
    shutil.copytree(whole / "checkpoint-3", parts / "checkpoint-3")
    launch(PRIOR_SCRIPT, base_args(tiny, parts, steps=6, **common, **{"--resume_from_checkpoint": "latest"}),
           env=offline_env(KANDINSKY_TRAIN_TRACE=str(tmp_path / "resumed.jsonl")))
    assert [r["index"] for r in trace(tmp_path / "resumed.jsonl")] == [
        r["index"] for r in trace(tmp_path / "whole.jsonl")][3:]
    assert_same_state(state_of(whole / "checkpoint-6", "prior"), state_of(parts / "checkpoint-6", "prior"), ema=False)


def test_a_stream_that_leaves_a_process_without_samples_is_refused(tiny, shards, tmp_path):
    proc = launch(PRIOR_SCRIPT, base_args(tiny, tmp_path, steps=4, **{
        "--train_data_dir": None, "--dataset_name": shards["parquet"], "--streaming": True,
        "--max_train_samples": 1}), launcher=DDP, env=offline_env(ACCELERATE_USE_CPU="true"), check=False)
    assert proc.returncode != 0
    assert ("error: The stream gave at least one of the 2 processes no sample in pass 0: nothing to train on. Give "
            "each process samples of its own (more data, a larger --max_train_samples, or fewer processes)"
            ) in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "model_index.json").exists() and not checkpoints(tmp_path)


def test_a_shard_the_reader_cannot_read_stops_the_stream_with_one_line(tmp_path, capsys):
    """A shard that fails in the middle of a pass (a remote one, or a local one with a sound footer): one line that
    says a shard could not be read and why, from a data-loader worker too, no traceback."""
    from types import SimpleNamespace

    import datasets
    import pyarrow as pa
    import torch
    from PIL import Image

    from kandinsky_train.errors import main_guard
    from kandinsky_train.streaming import StreamSamples
    from test_robustness import error_line

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    picture = (tmp_path / "a.png").read_bytes()

    def shards():
        yield {"image": picture}
        yield {"image": picture}
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer. Either the file is corrupted or this is not "
                              "a parquet file.")

    stage = SimpleNamespace(columns=(), variants=None, make_sample=lambda image, row, variant, shape: {
        "size": torch.tensor(image.size)})
    args = SimpleNamespace(shuffle_buffer_size=1, image_column="image", caption_column=None)
    samples = StreamSamples(datasets.IterableDataset.from_generator(shards), args, stage, seed=0)

    def train():
        for _ in torch.utils.data.DataLoader(samples, batch_size=1, num_workers=1, collate_fn=lambda s: s):
            pass

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main_guard(train)
    line = error_line(capsys.readouterr().err)
    assert line == ("error: A shard of the stream could not be read (ArrowInvalid: Parquet magic bytes not found in "
                    "footer. Either the file is corrupted or this is not a parquet file.); the log line above names "
                    "the file. Replace it with a good copy and resume with --resume_from_checkpoint latest (without "
                    "it, the stream is another one: start a new run).")
