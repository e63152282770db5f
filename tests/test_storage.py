"""A full disk, in-process: checkpoints, the embedding cache, validation images and the final save stop with one
line that names the folder, the bytes needed and free, leave nothing half-written, and keep earlier checkpoints.
A real full filesystem where the test can mount a small tmpfs (as root on Linux), else a simulated small disk (its
writes stopped by RLIMIT_FSIZE where a write must fail); an injected OSError(ENOSPC) elsewhere and for the writes
that a tiny tmpfs cannot reach in a unit test."""

import contextlib
import errno
import os
import re
import resource
import signal

import pytest
import torch

from fakes import FakeAccelerator
from kandinsky_train import checkpoint, faults, storage
from kandinsky_train.checkpoint_folders import Layout, read_state
from kandinsky_train.errors import UserError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(params=["simulated", "tmpfs"])
def small_disk(request, tmpfs, tmp_path, monkeypatch):
    """A 1 MiB disk: a folder the free-space checks see as one (faults.simulated_disk), which needs no root, and a
    real tmpfs where one can be mounted."""
    if request.param == "tmpfs":
        return tmpfs("1m")
    monkeypatch.setattr(faults, "_DISK", f"{tmp_path / 'disk'}:{1 << 20}")
    (tmp_path / "disk").mkdir()
    return tmp_path / "disk"


@pytest.fixture
def real_small_disk(tmpfs):
    """A 1 MiB tmpfs, for writes that must really run out of room (mounting needs root: skipped elsewhere)."""
    return tmpfs("1m")


@contextlib.contextmanager
def writes_fail_beyond(limit):
    """The kernel refuses to write any file beyond `limit` bytes (RLIMIT_FSIZE, as `ulimit -f`: no root needed), in
    torch's C++ and safetensors' Rust writers too: a write that fails in its middle, as on a disk that fills."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


class WritingAccelerator(FakeAccelerator):
    """save_state writes `size` bytes with torch.save, as accelerate writes optimizer.bin."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def save_state(self, folder):
        super().save_state(folder)
        torch.save(torch.zeros(self.size // 4), os.path.join(folder, "optimizer.bin"))


def save_at(accelerator, folder, step, expected_bytes=0):
    state = checkpoint.TrainState(seed=0, steps_per_epoch=10, global_step=step)
    return checkpoint.save(accelerator, str(folder), state, None, layout=Layout("prior"), expected_bytes=expected_bytes)


def test_a_checkpoint_that_cannot_fit_is_not_started(small_disk):
    accelerator = WritingAccelerator(600_000)
    save_at(accelerator, small_disk, 1)
    with pytest.raises(UserError) as raised:  # checkpoint-1 takes 600 kB; less is left
        save_at(accelerator, small_disk, 2)
    message = str(raised.value)
    needed, free = re.match(f"Not enough disk space to write checkpoint-2 in {small_disk}: it needs about "
                            r"(\d+\.\d) KiB \(the size of checkpoint-1\), (\d+\.\d) KiB free\. Nothing was written\. "
                            "checkpoint-1 and the checkpoints before it are intact.", message).groups()
    assert 585 < float(needed) < 620 and float(free) < float(needed)  # optimizer.bin and small placeholders
    assert "--resume_from_checkpoint latest" in message and "\n" not in message
    assert sorted(os.listdir(small_disk)) == ["checkpoint-1"]
    assert read_state(small_disk / "checkpoint-1")["global_step"] == 1
    (small_disk / "other").mkdir()
    with pytest.raises(UserError, match=r"checkpoint-1 in .* it needs about 2.0 MiB \(estimated from the model's "
                                        r"weights\)"):  # the first checkpoint
        save_at(accelerator, small_disk / "other", 1, expected_bytes=2 << 20)


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_disk_that_fills_during_a_checkpoint_keeps_the_earlier_one(disk, request, monkeypatch, tmp_path):
    """A real 1 MiB tmpfs where one can be mounted; everywhere a simulated 1 MiB disk whose writes the kernel stops
    where the disk would be full (each file: only the second checkpoint's one file is large)."""
    if disk == "tmpfs":
        small_disk, filling = request.getfixturevalue("real_small_disk"), contextlib.nullcontext()
    else:
        small_disk = tmp_path / "disk"
        small_disk.mkdir()
        monkeypatch.setattr(faults, "_DISK", f"{small_disk}:{1 << 20}")
    save_at(WritingAccelerator(100_000), small_disk, 1)
    if disk == "simulated":
        filling = writes_fail_beyond(storage.free_bytes(small_disk))
    # The first checkpoint is small, so the check lets the second one start; it runs out of space in torch.save,
    # which says "unexpected pos", not ENOSPC.
    with filling, pytest.raises(UserError, match=f"to write checkpoint-2 in {small_disk}: .* What it had written "
                                                 "was removed. checkpoint-1 and the checkpoints before it are intact."):
        save_at(WritingAccelerator(2_000_000), small_disk, 2)
    assert sorted(os.listdir(small_disk)) == ["checkpoint-1"]
    assert storage.free_bytes(small_disk) > 800_000  # the partial write no longer takes the space


def test_enospc_during_a_checkpoint_removes_the_partial_folder(tmp_path, monkeypatch):
    save_at(FakeAccelerator(), tmp_path, 1)
    monkeypatch.setattr(faults, "_FAULT", "save:2:ENOSPC")
    with pytest.raises(UserError, match=r"Not enough disk space to write checkpoint-2 .* What it had written "
                                        "was removed. checkpoint-1 and the checkpoints before it are intact."):
        save_at(FakeAccelerator(), tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_enospc_while_caching_embeddings_removes_the_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    from kandinsky_train.cache import EmbeddingCache, build
    from test_cache import VersionedSamples

    def full_disk(tensors, path):
        open(path, "wb").write(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors'

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    samples = VersionedSamples([1, 1, 1], [(4,)] * 3)
    cache = EmbeddingCache(tmp_path / "cache", "f" * 64)
    # 3 rows of 4 float32s, and each row's sample index and version (int64)
    with pytest.raises(UserError, match=f"to write the embedding cache in {cache.folder}: it needs about 96 bytes "
                                        r"\(the size of its tensors\), .* free. What it had written was removed. "
                                        ".*--embedding_cache_dir"):
        build(FakeAccelerator(), samples, [(cache, lambda batch: {"y": batch["x"] * 2})], batch_size=2)
    assert os.listdir(cache.folder) == [] and not cache.complete()


def test_enospc_while_saving_validation_images_names_them(tmp_path, monkeypatch):
    from PIL import Image

    from kandinsky_train.validation import save_images

    def full_disk(image, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise ENOSPC

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UserError, match="Not enough disk space to write the validation images in .*validation: it "
                                        "needs about 24.0 KiB"):
        save_images(str(tmp_path), [("a prompt", Image.new("RGB", (64, 64)))] * 2, step=3)
    assert os.listdir(tmp_path / "validation") == []


class Pipeline:
    """A pipeline as storage.save_pipeline sees one: components (a 1.1 KiB model) and a save_pretrained that writes
    model_index.json and unet/, its weights through `write_weights(path)`."""

    def __init__(self, write_weights):
        self.components = {"unet": torch.nn.Linear(16, 16), "scheduler": object()}
        self.write_weights = write_weights

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            f.write("{}")
        os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
        self.write_weights(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


LAYOUT = Layout("unet")


def complete_checkpoint(folder):
    """A checkpoint folder with what a plain decoder run resumes from (checkpoint_folders.Layout.missing)."""
    os.makedirs(os.path.join(folder, "unet"))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors"):
        open(os.path.join(folder, name), "w").close()


def final_save_fails(folder, pipe):
    """storage.save_pipeline into `folder` beside a checkpoint and a newer half-written one; the one line it stops
    with."""
    complete_checkpoint(os.path.join(folder, "checkpoint-1"))
    os.makedirs(os.path.join(folder, "checkpoint-2", "unet"))  # cut short: `latest` would not take it
    with pytest.raises(UserError) as raised:
        storage.save_pipeline(pipe, str(folder), LAYOUT)
    assert sorted(os.listdir(folder)) == ["checkpoint-1", "checkpoint-2"]  # what it wrote removed, the rest kept
    return str(raised.value)


def test_a_full_disk_in_the_final_save_removes_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "_FAULT", "final:ENOSPC")  # once the whole pipeline is written
    message = final_save_fails(tmp_path, Pipeline(lambda path: open(path, "wb").write(b"weights")))
    assert re.fullmatch(f"Not enough disk space to write the fine-tuned pipeline in {tmp_path}: it needs about "
                        r"1.1 KiB \(the size of its weights\), .* free. What it had written was removed. Free some "
                        r"space and run the same command with --resume_from_checkpoint latest: it resumes from "
                        r"checkpoint-1 \(untouched\) and saves it again.", message), message
    monkeypatch.setattr(faults, "_FAULT", None)
    with pytest.raises(UserError, match="free. Nothing was written"):  # checked before writing
        storage.save_output("the fine-tuned pipeline", pytest.fail, str(tmp_path), storage.free_bytes(tmp_path) + 2**30,
                            written=[], layout=LAYOUT)


def test_a_failed_final_save_removes_only_what_it_wrote(tmp_path, monkeypatch):
    """Issue 29: the cleanup removed whole folders that were there before the run (unet/ with the user's files in
    it), and its advice sent the user to a checkpoint the run had never saved. Now: the files and folders the save
    created, and the files it rewrote (their earlier content is gone), are removed; the rest stays."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "notes.txt").write_text("mine")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"old")  # rewritten by the save
    (tmp_path / "scheduler").mkdir()  # a component folder the save does not write into here
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    monkeypatch.setattr(faults, "_FAULT", "final:ENOSPC")
    with pytest.raises(UserError) as raised:
        storage.save_pipeline(Pipeline(lambda path: open(path, "wb").write(b"weights")), str(tmp_path), LAYOUT)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "scheduler", "scheduler/scheduler_config.json", "unet", "unet/notes.txt"]
    assert str(raised.value).endswith("What it had written was removed. This run saved no checkpoint to resume "
                                      "from: free some space and run the same command again."), raised.value


def test_a_safetensors_error_saying_the_disk_is_full_is_a_full_disk(tmp_path):
    """A real run's final save on a full disk ended in safetensors' own error, raised from save_pretrained:
    "SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)", which is no
    OSError and has no errno. On a disk with room here, so that only the error itself can tell."""
    from safetensors import SafetensorError

    def full_disk(path):
        open(path, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    message = final_save_fails(tmp_path, Pipeline(full_disk))
    assert message.startswith(f"Not enough disk space to write the fine-tuned pipeline in {tmp_path}: it needs about "
                              "1.1 KiB (the size of its weights), ") and "\n" not in message
    assert storage.ran_out_of_space(SafetensorError("I/O error: Disk quota exceeded (os error 122)"), str(tmp_path))
    # Rust numbers the OS error whatever the language of its text
    assert storage.ran_out_of_space(SafetensorError("I/O error: Kein Platz auf dem Gerät (os error 28)"), tmp_path)
    denied = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    assert not storage.ran_out_of_space(denied, str(tmp_path))
    with pytest.raises(SafetensorError, match="Permission denied"):  # not a full disk: passes through as it is
        storage.save_pipeline(Pipeline(lambda path: (_ for _ in ()).throw(denied)), str(tmp_path), LAYOUT)


def test_the_final_save_on_a_real_full_disk(tmpfs):
    """safetensors itself running out of room on a tmpfs (the weights passed the check before the write: another
    writer filled the disk meanwhile, say). 4 MiB, so that the disk is not nearly full once safetensors has removed
    its partial file: only the error can tell."""
    from safetensors.torch import save_file

    disk = tmpfs("4m")
    message = final_save_fails(disk, Pipeline(lambda path: save_file({"w": torch.zeros(2_000_000)}, path)))
    assert f"to write the fine-tuned pipeline in {disk}: it needs about 1.1 KiB" in message
    assert storage.free_bytes(disk) > 4_000_000


def test_a_full_disk_in_the_lora_adapter_save_removes_it(tmp_path, monkeypatch):
    class Adapted(torch.nn.Linear):
        def save_lora_adapter(self, folder, weight_name):
            open(os.path.join(folder, weight_name), "wb").write(b"adapter")

    monkeypatch.setattr(faults, "_FAULT", "final:ENOSPC")
    with pytest.raises(UserError, match=f"write the LoRA adapter in {tmp_path}: it needs about 288 bytes "):
        storage.save_lora_adapter(Adapted(8, 8), str(tmp_path), Layout("unet", lora=True))  # 72 weights: 288 bytes
    assert os.listdir(tmp_path) == []


def plain_write(tensors, path):
    """save_file's stand-in for a writer that leaves its partial file when the disk fills (safetensors does not)."""
    with open(path, "wb") as f:
        for tensor in tensors.values():
            f.write(tensor.numpy().tobytes())


@pytest.mark.parametrize("writer", ["safetensors", "leaves its partial file"])
def test_a_disk_that_fills_during_the_lora_adapter_write_removes_the_partial_file(writer, tmp_path, monkeypatch):
    """The adapter's write stopped in its middle, on a simulated 512 KiB disk that the check lets it start on:
    safetensors' writer (what diffusers' save_lora_adapter uses) and a writer that leaves its partial file behind,
    each cut by the kernel at 8 KiB. One line, and nothing is left. (A fake adapted model: peft refuses the torchao
    installed here in-process.)"""
    from safetensors.torch import save_file

    failed = []

    class Adapted(torch.nn.Linear):
        def save_lora_adapter(self, folder, weight_name):
            try:
                (save_file if writer == "safetensors" else plain_write)(
                    {"lora.weight": self.weight.detach()}, os.path.join(folder, weight_name))
            except Exception as error:
                failed.append((str(error), os.listdir(folder)))
                raise

    model = Adapted(128, 128, bias=False)  # 64 KiB of weights
    disk = tmp_path / "disk"
    disk.mkdir()
    monkeypatch.setattr(faults, "_DISK", f"{disk}:{512 << 10}")
    with writes_fail_beyond(8 << 10), pytest.raises(UserError, match=f"write the LoRA adapter in {disk}: it needs "
                                                                     r"about 64.0 KiB .* What it had written was "
                                                                     r"removed\."):
        storage.save_lora_adapter(model, str(disk), Layout("unet", lora=True))
    # stopped midway by the kernel, not before (the second writer's partial file was there)
    assert len(failed) == 1 and "File too large" in failed[0][0], failed
    assert failed[0][1] == ([] if writer == "safetensors" else [storage.LORA_WEIGHTS]), failed
    assert os.listdir(disk) == []


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not about space"):
        with storage.writing("a file", str(tmp_path), 0):
            raise ValueError("not about space")
